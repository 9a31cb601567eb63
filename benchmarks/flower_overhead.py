"""Flower deployment overhead: seconds per training step (every client's split step) through Flower's
deployment runtime on localhost against the in-process engine, and the bytes Flower's messages
carry against the bytes the time model counts; same model, clients, cuts, ranks and batches as
benchmarks/ray_overhead.py, both runs side by side in one script.

    .venv/bin/python benchmarks/flower_overhead.py [--model smollm2-135m] [--clients 2] [--steps 6]
    .venv/bin/python benchmarks/flower_overhead.py --quick      # the tiny model: checks the script works

The deployment runtime is engines/flower_local.py's LocalFederation, as tests/test_flower_deployment.py
starts it: a SuperLink on 127.0.0.1 with TLS and SuperNode authentication, one SuperNode (and its
ClientApp worker) per client, the run started with `flwr run`. Its ServerApp, in a process of the
SuperLink's, writes one line per exchange it makes with the nodes (flower_engine.WIRE_LOG_ENV).

Step time: one round of `--steps` local steps; the time from the end of a step (the last client's
backward answered) to the end of the next, averaged over the round's steps after the first (which
warms up), as ray_overhead.py times them. Start-up, the warm-up step, importance, aggregation,
validation, checkpoints and the export are not in it.

Wire bytes: flower_engine.wire_bytes of every message the ServerApp sends and every reply it
receives (each Message's protobuf without content, its object tree, and every object it deflates
into, as Flower serializes them; no HTTP or TLS framing, polls, heartbeats or receipts), over the
round's messages: its split steps, control (configure, measure_importance, counters,
importance_report) and aggregation (upload, apply_update, apply_adapters). The time model counts the
round's metrics `bytes_up + bytes_down` (engines/traffic.py: activations, gradients, adapters up and
updates down). Messages outside the round's work (start-up, warm-up, the engine's state snapshots,
validation, checkpoint, export) are printed by type and in the whole run's ratio, not in the RESULT.

Last lines: RESULT flower_overhead_ratio=<deployment s/step over in-process s/step> (target <= 1.5)
and RESULT flower_wire_bytes_ratio=<round's message bytes over the ledger's bytes> (target <= 1.1).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from hsplitlora.config import RunConfig
from hsplitlora.engines.flower_engine import WIRE_LOG_ENV
from hsplitlora.engines.flower_local import LocalFederation
from hsplitlora.rounds import Reporter, run

STEP_END = ("query.backward", "query.local_step")  # the call that ends a client's step
STEP = ("query.forward", "query.tail_step", *STEP_END)
CONTROL = ("query.configure", "query.measure_importance", "query.counters", "query.importance_report")
AGGREGATION = ("query.upload", "query.apply_update", "query.apply_adapters")


class StepClock(Reporter):
    def __init__(self):
        self.times: list[float] = []

    def step(self, round_, step, losses):
        self.times.append(time.perf_counter())


def seconds_per_step(ends: list[float]) -> float:
    """The mean gap between consecutive step ends (the first step, which warms up, not timed)."""
    gaps = [b - a for a, b in zip(ends, ends[1:], strict=False)]
    return sum(gaps) / len(gaps) if gaps else float("nan")


def round_start(exchanges: list[dict]) -> int:
    """Index of round 1's first exchange: its configure, after the warm-up step if there was one."""
    warm = [i for i, e in enumerate(exchanges) if e["type"] == "query.warm_up"]
    after = warm[-1] + 1 if warm else 0
    return next(i for i in range(after, len(exchanges)) if exchanges[i]["type"] == "query.configure")


def step_ends(exchanges: list[dict], clients: int) -> list[float]:
    """When each step of the round ended: the answer to its last client's backward."""
    ends = [e["end"] for e in exchanges if e["type"] in STEP_END]
    return [ends[i + clients - 1] for i in range(0, len(ends) - clients + 1, clients)]


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--split-point", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads of every process (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="the tiny model, cut 2, 3 steps, batch 4: a check")
    parser.add_argument("--keep", type=Path, help="keep the runs, the federation's logs and the exchanges here")
    args = parser.parse_args()
    batch, val_size = 8, 8
    if args.quick:
        args.model, args.steps, args.split_point, batch, val_size = "tiny", 3, 2, 4, 4
    settings = dict(model=args.model, clients=args.clients, rounds=1, local_steps=args.steps, rank=8,
                    split_point=args.split_point, batch_size=batch, val_size=val_size, budgets="4GB")  # fmt: skip
    if args.threads is not None:
        settings["threads"] = args.threads
    rates, round_rates = {}, {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = args.keep or Path(temporary)
        clock = StepClock()
        run(RunConfig(**settings, engine="inprocess", output_dir=str(folder / "inprocess")), reporter=clock)
        rates["in-process"] = seconds_per_step(clock.times)
        round_rates["in-process"] = read_metrics(folder / "inprocess")[0]["round_wall_time_s"] / args.steps

        wire_log = folder / "exchanges.jsonl"
        os.environ[WIRE_LOG_ENV] = str(wire_log)  # the federation's processes inherit it: the ServerApp writes it
        federation = LocalFederation(folder / "federation", clients=args.clients, extra_keys=0)
        try:
            started = time.perf_counter()
            federation.start()
            up = time.perf_counter() - started
            output = federation.run_app({**settings, "output_dir": str(folder / "flower")}, timeout_s=3600)
            (folder / "flwr-run.log").write_text(output)
        finally:
            federation.stop()
            del os.environ[WIRE_LOG_ENV]
        if not (folder / "flower" / "metrics.jsonl").exists():  # `flwr run` returns 0 when the ServerApp fails
            raise SystemExit(f"the deployment's run did not finish; flwr run said:\n{output.strip()[-1500:]}")
        exchanges = [json.loads(line) for line in wire_log.read_text().splitlines()]
        metrics = read_metrics(folder / "flower")
    events = [e for m in metrics for e in m["events"]]
    if events or any(e["replies"] != e["messages"] for e in exchanges):
        print(f"WARNING: the deployment's run was not clean (events {events}); the figures below are not comparable")
    start = round_start(exchanges)
    rates["deployment"] = seconds_per_step(step_ends(exchanges[start:], args.clients))
    round_rates["deployment"] = metrics[0]["round_wall_time_s"] / args.steps

    print(f"model {args.model}, {args.clients} clients, split point {args.split_point}, rank 8, batch {batch}, "
          f"threads {args.threads or 'default'}; 1 round of {args.steps} steps, {args.steps - 1} timed")  # fmt: skip
    print(f"Flower deployment on 127.0.0.1 (TLS, SuperNode authentication): SuperLink and {args.clients} "
          f"SuperNodes up in {up:.1f} s")  # fmt: skip
    for name in rates:
        print(f"  {name:>10}: {rates[name]:.3f} s per step of {args.clients} clients "
              f"(round wall time / steps, with importance, aggregation, validation, checkpoint: "
              f"{round_rates[name]:.3f})")  # fmt: skip

    by_type: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for e in exchanges[start:]:
        row = by_type[e["type"]]
        row[0], row[1], row[2] = row[0] + e["messages"], row[1] + e["sent"], row[2] + e["received"]
    before = exchanges[:start]
    print("wire bytes (flower_engine.wire_bytes of each message sent and each reply received):")
    print(f"  {'message type':<28}{'messages':>9}{'sent MB':>12}{'received MB':>13}  in the round's count")
    print(
        f"  {'(start-up and warm-up)':<28}{sum(e['messages'] for e in before):>9}"
        f"{sum(e['sent'] for e in before) / 1e6:>12.4f}{sum(e['received'] for e in before) / 1e6:>13.4f}  no"
    )
    for name, (count, sent, received) in sorted(by_type.items(), key=lambda item: -item[1][1] - item[1][2]):
        counted = "yes" if name in STEP + CONTROL + AGGREGATION else "no"
        print(f"  {name:<28}{count:>9}{sent / 1e6:>12.4f}{received / 1e6:>13.4f}  {counted}")
    round_bytes = sum(e["sent"] + e["received"] for e in exchanges[start:] if e["type"] in STEP + CONTROL + AGGREGATION)
    step_bytes = sum(e["sent"] + e["received"] for e in exchanges[start:] if e["type"] in STEP)
    all_bytes = sum(e["sent"] + e["received"] for e in exchanges)
    ledger = sum(m["bytes_up"] + m["bytes_down"] for m in metrics)
    cut = sum(c[f"bytes_{k}"] for m in metrics for c in m["clients"] for k in
              ("activations", "gradients", "activations_down", "gradients_up"))  # fmt: skip
    print(f"ledger (metrics bytes_up + bytes_down): {ledger / 1e6:.4f} MB, of it the cut's {cut / 1e6:.4f} MB")
    print(f"  the round's messages {round_bytes / 1e6:.4f} MB: {round_bytes / ledger:.3f} of the ledger; "
          f"split steps alone {step_bytes / 1e6:.4f} MB: {step_bytes / cut:.3f} of the cut's")  # fmt: skip
    print(f"  every message of the run {all_bytes / 1e6:.4f} MB: {all_bytes / ledger:.3f} of the ledger")
    print(f"RESULT flower_overhead_ratio={rates['deployment'] / rates['in-process']:.3f}")
    print(f"RESULT flower_wire_bytes_ratio={round_bytes / ledger:.3f}")


if __name__ == "__main__":
    main()
