"""Errors meant for the user: one clear sentence, shown without a traceback (CLI exit status 2)."""


class UsageError(ValueError):
    """A bad value given by the user: the message names the value and what would be valid."""


class MalformedMessage(UsageError):
    """A message from another process that does not decode to what its type allows (engines/
    flower_codec.py): the message names the part that is wrong."""


def read_text(path, what: str = "file") -> str:
    """A text file a user gave or a run wrote, as UTF-8; one sentence naming it when it is missing
    or unreadable."""
    from pathlib import Path

    check_regular_file(path, what)
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} {path} does not exist.") from None
    except UnicodeDecodeError as error:
        raise UsageError(f"{what} {path} cannot be read as UTF-8 text (byte {error.object[error.start]:#x} at position "
                         f"{error.start}); save it as UTF-8.") from None  # fmt: skip
    except OSError as error:
        raise UsageError(f"{what} {path} cannot be read as UTF-8 text ({error.__class__.__name__}).") from None


def check_regular_file(path, what: str = "file", missing: str = "") -> None:
    """Refuse, by name, a path that is not a regular file (or a link to one): reading a FIFO blocks,
    /dev/zero never ends. `missing` is advice added when nothing is there."""
    import os
    import stat
    from pathlib import Path

    path = Path(path)
    link = f" (a link to {os.readlink(path)})" if path.is_symlink() else ""
    try:
        mode = path.stat().st_mode  # follows links: what a read would open
    except FileNotFoundError:
        raise UsageError(f"{what} {path}{link} does not exist{missing}.") from None
    except OSError as error:
        raise UsageError(f"{what} {path}{link} cannot be read ({error.strerror}).") from None
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip
    kind = next((name for test, name in kinds if test(mode)), "not a regular file")
    raise UsageError(f"{what} {path}{link} is {kind}, not a regular file; give a file.")
