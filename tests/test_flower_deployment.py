"""Flower's deployment runtime on 127.0.0.1 (engines/flower_local.py): a SuperLink with TLS and
SuperNode authentication, one SuperNode per client as its own process with a long-lived worker
for its ClientApp, the run started with `flwr run`. The run's numbers equal the in-process run's,
a SuperNode whose key was never registered is refused, a SuperNode killed mid-run leaves its
client out until it is started again, and stopping the federation leaves no process behind."""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.engines.flower_local import LocalFederation
from hsplitlora.rounds import run

pytest.importorskip("flwr")
pytest.importorskip("cryptography")

WALL = ("wall_time_s", "round_wall_time_s")
# Tiny, and few calls: every call goes through a SuperLink and a SuperNode, several processes on 2 CPU cores.
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
        assert len(federation.online()) == 2
        stranger = federation.start_supernode(2, client_id=1)  # node key 2 was never registered
        lines, online_after, started = run_losing_a_node(federation, tmp_path / "flower")
        assert stranger.wait(timeout=60) != 0  # refused while the run went on
        assert "could not establish a connection to the SuperLink" in federation.log("supernode2")
    finally:
        federation.stop()
    assert ours_left([p.pid for p in federation.processes.values()] + started) == []
    # Until a node was killed, the run's numbers are exactly the in-process run's.
    assert without_wall(lines[:KILLED_AFTER]) == without_wall(json.loads(json.dumps(local)))
    # The killed node's client was left out, the run went on, and once its node was back, so was it.
    assert [line["round"] for line in lines] == list(range(1, ROUNDS + 1))
    events = [[(e["event"], e["client"]) for e in line["events"] if "client" in e] for line in lines]
    out = next(i for i, found in enumerate(events) if ("client_lost", 1) in found)
    assert out >= KILLED_AFTER
    assert online_after < ROUNDS, "the node came back only after the last round (the machine is too slow)"
    # The first round after the loss in which the client trains again is the one that restarted it
    # (that may be the round already under way when the test saw its node online again).
    back = next(i for i in range(out + 1, len(lines))
                if next(c for c in lines[i]["clients"] if c["client"] == 1)["samples"] > 0)  # fmt: skip
    assert ("client_restarted", 1) in events[back]
    assert all(line["val_ppl"] is not None for line in lines)


KILLED_AFTER = SETTINGS["rounds"]  # rounds before the kill, compared with the in-process run
ROUNDS = KILLED_AFTER + 4  # the round it is lost in, one it may still be down in, the one it is back in, one spare


def run_losing_a_node(federation: LocalFederation, out) -> tuple[list[dict], int, list[int]]:
    """A run (`flwr run`) in which client 1's SuperNode is killed (SIGKILL) once KILLED_AFTER rounds
    are done, and started again once the run has left it out: the run's metrics, how many rounds had
    ended when the node was online again, and the processes the federation had started for the run."""
    metrics = out / "metrics.jsonl"
    failures: list[BaseException] = []

    def target() -> None:
        try:
            federation.run_app({**SETTINGS, "rounds": ROUNDS, "output_dir": str(out)}, timeout_s=600)
        except BaseException as error:  # noqa: BLE001  (raised below, in the test's thread)
            failures.append(error)

    def lines() -> list[dict]:
        return [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []

    def wait_for(condition, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not condition() and thread.is_alive():
            assert time.monotonic() < deadline, "the run did not get there in time"
            time.sleep(0.2)

    thread = threading.Thread(target=target)
    thread.start()
    wait_for(lambda: len(lines()) >= KILLED_AFTER, 400)
    started = federation.descendants()  # the ServerApp and what it started, while they run
    federation.kill_supernode(1)
    wait_for(lambda: any(e.get("event") == "client_lost" for line in lines() for e in line["events"]), 300)
    federation.start_supernode(1, client_id=1)  # the same key: the same node, with nothing in memory
    wait_for(lambda: len(federation.online()) == 2, 120)
    online_after = len(lines())
    thread.join(timeout=600)
    if failures:
        raise failures[0]
    return lines(), online_after, started + federation.descendants()
