"""SIGTERM and Ctrl-C honoured in every phase. Python runs a signal handler only between bytecodes,
so one long computation (an attention kernel over a huge batch, a Ray connection loop) would
delay it without bound; a watcher thread, woken by the signal itself, ends the process when the
handler has not done so within a grace period. Every file the tool writes is written atomically
(a temporary name, then a rename), so ending at any moment leaves nothing half-written."""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

GRACE_S = 10.0  # time for the ordinary handler (cleanup, "resume with ..." advice) before the hard exit
EXIT_STATUS = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal's number, as shells report
exit_note: Callable[[], str] | None = None  # what to tell on a hard exit (a run: how to resume); a command sets it


@contextmanager
def exit_promptly_on_signals(grace_s: float = GRACE_S) -> Iterator[None]:
    """While the block runs, a SIGTERM or SIGINT the main thread has not acted on within `grace_s`
    seconds (or a second such signal) ends the process with 143 or 130. Only from the main thread
    (elsewhere signals do not reach Python, and the block runs unwatched)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
        previous = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except (ValueError, OSError):  # a platform without wakeup fds for pipes: run unwatched
        os.close(read_fd)
        os.close(write_fd)
        yield
        return
    finished = threading.Event()
    watcher = threading.Thread(target=_watch, args=(read_fd, finished, grace_s), daemon=True, name="signal-watch")
    watcher.start()
    try:
        yield
    finally:
        global exit_note
        finished.set()
        exit_note = None
        signal.set_wakeup_fd(previous)
        os.close(write_fd)  # the watcher reads the end of the pipe and returns
        watcher.join(timeout=5)


def _watch(read_fd: int, finished: threading.Event, grace_s: float) -> None:
    deadline, status = None, 0
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if finished.is_set():
                return
            if not ready:  # the grace period passed and the main thread is still computing
                _exit(status)
            data = os.read(read_fd, 64)
            if not data:
                return
            for number in data:
                if number not in EXIT_STATUS:
                    continue
                if deadline is not None:  # a second signal: the user does not want to wait
                    _exit(EXIT_STATUS[number])
                deadline, status = time.monotonic() + grace_s, EXIT_STATUS[number]
    finally:
        os.close(read_fd)


def _exit(status: int) -> None:
    message = "interrupted"
    with suppress(Exception):  # the note reads the file system; the exit must happen whatever it finds
        message = exit_note() if exit_note is not None else message
    print(message, file=sys.stderr, flush=True)
    os._exit(status)
