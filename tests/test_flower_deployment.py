"""Flower's deployment runtime on 127.0.0.1 (engines/flower_local.py): a SuperLink with TLS and
SuperNode authentication, one SuperNode per client as its own process with a long-lived worker
for its ClientApp, the run started with `flwr run`. The run's numbers equal the in-process run's,
a SuperNode whose key was never registered is refused, and stopping the federation leaves no
process behind."""

from __future__ import annotations

import json
import subprocess

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.engines.flower_local import LocalFederation
from hsplitlora.rounds import run

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

WALL = ("wall_time_s", "round_wall_time_s")
# Tiny, and few calls: each call through a SuperLink and a SuperNode takes 1 to 3 s on 2 CPU cores.
SETTINGS = dict(model="tiny", clients=2, rounds=2, local_steps=1, budgets="5MB,20MB", val_size=4, batch_size=4,
                split_rule="deepest", replan_delta=0.0)  # fmt: skip


def without_wall(value):
    if isinstance(value, dict):
        return {k: without_wall(v) for k, v in value.items() if k not in WALL}
    if isinstance(value, list):
        return [without_wall(v) for v in value]
    return value


def ours_left(pids: list[int]) -> list[str]:
    """Processes still running that are one of `pids` or were started by one (Flower's superexec
    names its parent with --parent-pid)."""
    table = subprocess.run(["ps", "-eo", "pid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    left = []
    for line in table.splitlines():
        pid, stat, args = (line.split(None, 2) + [""])[:3]
        if stat.startswith("Z"):
            continue
        if int(pid) in pids or any(f"--parent-pid {p}" in args for p in pids):
            left.append(line.strip())
    return left


def test_deployment_with_tls_and_node_keys_equals_in_process_and_refuses_a_stranger(tmp_path):
    local = run(RunConfig(**SETTINGS, output_dir=str(tmp_path / "local"))).metrics
    federation = LocalFederation(tmp_path / "federation", clients=2, extra_keys=1)
    try:
        federation.start()  # the SuperLink (TLS, authentication on), both clients' keys registered, their nodes
        assert "https://127.0.0.1:" in federation.log("superlink")  # TLS, on localhost only
        stranger = federation.start_supernode(2, client_id=1)  # node key 2 was never registered
        assert stranger.wait(timeout=60) != 0
        assert "could not establish a connection to the SuperLink" in federation.log("supernode2")
        assert len(federation.online()) == 2
        federation.run_app({**SETTINGS, "output_dir": str(tmp_path / "flower")}, timeout_s=500)
        started = federation.descendants()
    finally:
        federation.stop()
    assert ours_left([p.pid for p in federation.processes.values()] + started) == []
    lines = (tmp_path / "flower" / "metrics.jsonl").read_text().splitlines()
    flower = [json.loads(line) for line in lines]
    assert without_wall(flower) == without_wall(json.loads(json.dumps(local)))
