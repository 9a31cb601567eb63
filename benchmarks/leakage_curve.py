"""The leakage curve L(s) of a model on E2E: what the main server recovers of the clients' text at
each cut, in the standard and the U-shaped split (method.md section 10; `hsplitlora leakage`).

It trains two short runs (SmolLM2-135M by default, 2 clients, one round, cut after block 1, seed
0; one standard, one U-shaped), trains one attacker per cut on public text (E2E's test set run
through the public base model: a same-domain attacker, a strong one), and attacks each run's
messages at every cut: each client's first training batches through its own forward, with the
run's final weights and compression. Writes the curve as JSON (what a planner can read: per cut,
the best attack's share of all tokens from the activations alone and with the labels) and a plot.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/leakage_curve.py --threads 1 \\
        --json docs/privacy/leakage_smollm2-135m_e2e.json --plot docs/privacy/leakage_smollm2-135m_e2e.png

Last line: RESULT leakage_cut1_token_recovery=<share of all tokens the best attack recovers from the
standard split's activations at cut 1, labels aside>.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path


def train_run(folder: Path, split_mode: str, args: argparse.Namespace) -> Path:
    from hsplitlora.config import RunConfig
    from hsplitlora.rounds import run

    if (folder / split_mode / "model.safetensors").is_file():  # a finished run kept in --work
        return folder / split_mode
    config = RunConfig(model=args.model, clients=2, rounds=1, local_steps=args.steps, val_size=16, split_point=1,
                       split_mode=split_mode, output_dir=str(folder / split_mode), threads=args.threads,
                       seed=args.seed)  # fmt: skip
    return run(config).run_dir


def plot(curve: dict, path: Path) -> None:
    from hsplitlora.plots import pyplot

    plt = pyplot()
    figure, ax = plt.subplots(figsize=(6.5, 4))
    cuts = [point["cut"] for point in curve["standard"]]
    styles = (("standard", "token_recovery_with_labels", "standard split: activations + labels", "o-"),
              ("standard", "token_recovery", "standard split: activations alone", "s--"),
              ("u", "token_recovery", "U-shaped split (activations alone)", "^-"))  # fmt: skip
    for mode, key, label, style in styles:
        ax.plot(cuts, [point[key] for point in curve[mode]], style, label=label)
    ax.plot(cuts, [point["chance"] for point in curve["standard"]], ":", color="grey", label="chance (most frequent)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(cuts, [str(c) for c in cuts])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("cut s (blocks on the client)")
    ax.set_ylabel("share of the client's tokens recovered")
    ax.set_title(f"{curve['model']} on E2E: what the main server reads")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--cuts", default="1,2,4,8,16,24")
    parser.add_argument("--steps", type=int, default=8, help="local steps of each short run (8)")
    parser.add_argument("--batches", type=int, default=4, help="each client's first N training batches (4)")
    parser.add_argument("--public-rows", type=int, default=400, help="public E2E test records for the attacker")
    parser.add_argument("--attack-steps", type=int, default=400, help="training steps of each cut's decoder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--work", help="keep the two runs here (default: a temporary folder)")
    parser.add_argument("--json", help="write the curve here")
    parser.add_argument("--plot", help="write the plot here (PNG)")
    args = parser.parse_args()
    import torch

    from hsplitlora.models.loading import load_model
    from hsplitlora.privacy.leakage import (
        format_report,
        measure_leakage,
        parse_cuts,
        public_items,
        read_run,
        train_attacker,
    )

    if args.threads:
        torch.set_num_threads(args.threads)
    cuts = parse_cuts(args.cuts)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        runs = {mode: train_run(work, mode, args) for mode in ("standard", "u")}
        trained = time.perf_counter()
        saved, _ = read_run(runs["standard"])
        tokenizer = load_model(args.model, seed=args.seed).tokenizer
        items, public = public_items(saved, tokenizer, args.public_rows)
        attacker = train_attacker(args.model, args.seed, saved.get("dtype", "float32"), saved["compression"], cuts,
                                  items, tokenizer.pad_token_id, public, args.attack_steps)  # fmt: skip
        attacked = time.perf_counter()
        reports = {
            mode: measure_leakage(folder, cuts, args.batches, attacker=attacker) for mode, folder in runs.items()
        }
    for report in reports.values():
        print(format_report(report))
    curve = {
        "model": args.model,
        "data": "E2E: clients train on devset.csv; the attacker's public text is testset_w_refs.csv",
        "measured": datetime.date.today().isoformat(),
        "command": "OMP_NUM_THREADS=1 .venv/bin/python " + " ".join(sys.argv),
        "setting": {
            "clients": 2,
            "rounds": 1,
            "local_steps": args.steps,
            "trained_cut": 1,
            "seed": args.seed,
            "batches_per_client": args.batches,
            "public_rows": args.public_rows,
            "attack_steps": args.attack_steps,
            "attacker": reports["standard"]["attacker"],
        },  # fmt: skip
        "seconds": {
            "training": round(trained - started, 1),
            "attacker": round(attacked - trained, 1),
            "attacks": round(time.perf_counter() - attacked, 1),
        },  # fmt: skip
    }
    for mode, report in reports.items():
        curve[mode] = [{**point, "chance": entry["chance"]["all"],
                        **{f"{attack}_{key}": entry[attack][key] for attack in ("learned", "nearest")
                           for key in ("prompt", "response", "all", "rouge_l")}}
                       for point, entry in zip(report["curve"], report["cuts"], strict=True)]  # fmt: skip
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(curve, indent=1) + "\n")
    if args.plot:
        plot(curve, Path(args.plot))
    first = curve["standard"][0]
    print(f"RESULT leakage_cut{first['cut']}_token_recovery={first['token_recovery']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
