"""What differential privacy costs (issue 24, docs/privacy.md): HSplitLoRA in the study's regime ii
(SmolLM2-135M, five clients, E2E) without DP, with DP-SGD on the adapters and with noise on the
activations, each at target epsilons; final validation perplexity per seed, each client's epsilon
as the accountant gives it, and what the main server's attack recovers at cut 1 from the
activations a run with and without activation noise sends.

Every run is the study's (benchmarks/study.py, FULL spec, regime ii) with only the DP settings
added, so the batches, shards, plan and schedule are those of the committed study runs' setting.
A finished run kept in --work is reused, so the script can be stopped and started again; the run
without DP is the study's own (docs/results/runs/ii/hsplitlora) where its settings are the same.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/dp_cost.py --threads 1 --seeds 0 \\
        --kinds none,sgd:8,sgd:1,activations:8 --work /tmp/dp --json docs/privacy/dp_cost.json

A DP-SGD kind may name its logical batch: `sgd:8:10` is epsilon 8 with a noisy step every 10
batches (--dp-batches 10).

Last line: RESULT dpsgd_eps8_ppl_ratio=<final val perplexity with DP-SGD at epsilon 8 over without,
mean over the seeds run, of the logical batch that gives the lowest> (goal: at most 1.15).
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

STUDY_RUNS = Path(__file__).resolve().parents[1] / "docs" / "results" / "runs" / "ii" / "hsplitlora"
ACTIVATION_CLIP = 450.0  # about each example's activation norm after block 1 of SmolLM2-135M (batch 8 of E2E)


def parse_kind(text: str) -> tuple[str, float | None, int]:
    """`none`, `sgd:EPS[:K]` or `activations:EPS` (a target epsilon), or `activations-sigma:SIGMA`;
    with K, the batches of each DP-SGD step."""
    name, _, value = text.partition(":")
    value, _, batches = value.partition(":")
    try:
        if name == "none" and not value:
            return name, None, 1
        if name in ("sgd", "activations", "activations-sigma") and value and (not batches or name == "sgd"):
            return name, float(value), int(batches or 1)
    except ValueError:
        pass
    raise SystemExit(f"kind {text!r} is not none, sgd:EPS[:K], activations:EPS or activations-sigma:SIGMA")


def dp_settings(kind: str, value: float | None, batches: int = 1) -> dict:
    if kind == "sgd":
        return {"dp_epsilon": value, "dp_grad_clip": 1.0, "dp_batches": batches}
    if kind == "activations":
        return {"dp_activations_epsilon": value, "dp_clip": ACTIVATION_CLIP}
    if kind == "activations-sigma":
        return {"dp_activations_sigma": value, "dp_clip": ACTIVATION_CLIP}
    return {}


def label_of(kind: str, value: float | None, batches: int = 1) -> str:
    return kind if value is None else f"{kind}-{value:g}" + (f"-k{batches}" if batches > 1 else "")


def train(work: Path, kind: str, value: float | None, batches: int, seed: int, threads: int | None) -> Path:
    import dataclasses

    from study import FULL, _same_config, regime_of, run_config

    from hsplitlora.rounds import run

    folder = work / label_of(kind, value, batches) / f"seed{seed}"
    if (folder / "summary.json").is_file():
        return folder
    config = run_config(FULL, regime_of(FULL, "ii"), "hsplitlora", seed, folder)
    config = dataclasses.replace(config, threads=threads, **dp_settings(kind, value, batches)).validate()
    study_run = STUDY_RUNS / f"seed{seed}"  # without DP, the study's own run is this run
    if kind == "none" and (study_run / "summary.json").is_file():
        try:  # threads are not a result's setting; an unreadable config.json is no match (_same_config)
            threads_then = json.loads((study_run / "config.json").read_text()).get("threads")
        except (OSError, json.JSONDecodeError):
            threads_then = None
        if _same_config(study_run, dataclasses.replace(config, threads=threads_then)):
            return study_run
    return run(config).run_dir


def final_ppl(folder: Path) -> float:
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return lines[-1]["val_ppl"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0", help="seeds, e.g. 0,1,2")
    parser.add_argument("--kinds", default="none,sgd:8,sgd:3,sgd:1,activations:8",
                        help="none, sgd:EPS, activations:EPS, activations-sigma:SIGMA, comma-separated")  # fmt: skip
    parser.add_argument("--work", default="/tmp/hsplitlora-dp", help="where the runs are kept (and reused)")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--threads", type=int, help="torch threads")
    parser.add_argument("--leakage", action="store_true",
                        help="also attack cut 1 of every run with and without activation noise")  # fmt: skip
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    kinds = [parse_kind(k) for k in args.kinds.split(",")]
    work = Path(args.work)
    started = time.perf_counter()
    rows = []
    for kind, value, batches in kinds:
        for seed in seeds:
            t0 = time.perf_counter()
            folder = train(work, kind, value, batches, seed, args.threads)
            summary = json.loads((folder / "summary.json").read_text())
            privacy = summary.get("privacy", {})
            epsilons = {mech: max(c[mech]["epsilon"] for c in privacy["clients"])
                        for mech in ("sgd", "activations") if privacy and mech in privacy["clients"][0]}  # fmt: skip
            row = {"kind": kind, "target": value, "batches": batches, "seed": seed, "final_val_ppl": final_ppl(folder),
                   "max_client_epsilon": epsilons, "dp": privacy.get("dp"), "run": str(folder),
                   "seconds": time.perf_counter() - t0}  # fmt: skip
            rows.append(row)
            print(f"{label_of(kind, value, batches):>22} seed {seed}: final val ppl {row['final_val_ppl']:.4f}, "
                  f"epsilon {epsilons or '-'} ({row['seconds']:.0f} s)", flush=True)  # fmt: skip
    leakage = []
    if args.leakage:
        from hsplitlora.privacy.leakage import measure_leakage

        attacker = None
        for row in rows:
            if row["kind"] in ("sgd",):
                continue  # DP-SGD leaves the activations as they are
            report = measure_leakage(row["run"], cuts=[1], attacker=attacker)
            recovery = report["curve"][0]["token_recovery"]
            leakage.append({"kind": row["kind"], "target": row["target"], "seed": row["seed"],
                            "cut1_token_recovery": recovery, "final_val_ppl": row["final_val_ppl"]})  # fmt: skip
            print(f"{label_of(row['kind'], row['target']):>22} seed {row['seed']}: cut-1 recovery {recovery:.3f}",
                  flush=True)  # fmt: skip
    base = {r["seed"]: r["final_val_ppl"] for r in rows if r["kind"] == "none"}
    by_batches: dict[int, list[float]] = {}
    for r in rows:
        if r["kind"] == "sgd" and r["target"] == 8 and r["seed"] in base:
            by_batches.setdefault(r["batches"], []).append(r["final_val_ppl"] / base[r["seed"]])
    for batches, found in sorted(by_batches.items()):
        print(f"DP-SGD at epsilon 8, a step every {batches} batches: perplexity ratio {statistics.mean(found):.4f} "
              f"({len(found)} seeds)")  # fmt: skip
    ratios = min(by_batches.values(), key=statistics.mean) if by_batches else []
    result = {
        "measured": datetime.date.today().isoformat(),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
        "setting": "benchmarks/study.py FULL, regime ii, strategy hsplitlora; DP settings added",
        "activation_clip": ACTIVATION_CLIP,
        "runs": rows,
        "leakage": leakage,
        "seconds": time.perf_counter() - started,
    }
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if ratios:
        print(f"RESULT dpsgd_eps8_ppl_ratio={statistics.mean(ratios):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
