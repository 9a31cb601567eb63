"""Flower's deployment runtime on 127.0.0.1 (engines/flower_local.py): a SuperLink with TLS and
SuperNode authentication, SuperNodes as separate processes; a SuperNode whose key was never
registered is refused, and stopping the federation leaves no process behind."""

from __future__ import annotations

import subprocess

import pytest

from hsplitlora.engines.flower_local import LocalFederation

pytest.importorskip("flwr")
pytest.importorskip("cryptography")


def ours_left(pids: list[int]) -> list[str]:
    """Processes still running that are one of `pids` or were started by one (Flower's superexec
    names its parent with --parent-pid)."""
    table = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True, check=True).stdout
    left = []
    for line in table.splitlines():
        pid, _, args = line.strip().partition(" ")
        if int(pid) in pids or any(f"--parent-pid {p}" in args for p in pids):
            left.append(line.strip())
    return left


def test_a_supernode_without_a_registered_key_is_refused_and_nothing_is_left_running(tmp_path):
    federation = LocalFederation(tmp_path, clients=1, extra_keys=1)
    try:
        federation.start()  # the SuperLink (TLS, authentication on) and client 0's node, its key registered
        assert len(federation.online()) == 1
        stranger = federation.start_supernode(1, client_id=1)  # node key 1 was never registered
        assert stranger.wait(timeout=60) != 0
        assert "could not establish a connection to the SuperLink" in federation.log("supernode1")
        assert len(federation.online()) == 1
        assert "https://127.0.0.1:" in federation.log("superlink")  # TLS, on localhost only
    finally:
        federation.stop()
    assert ours_left([p.pid for p in federation.processes.values()]) == []
