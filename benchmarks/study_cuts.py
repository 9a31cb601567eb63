"""Whether today's planner still cuts where the study's committed runs were cut: for every split
strategy's run folder under docs/results/runs, the round-1 cuts in its metrics.jsonl against the
cuts `hsplitlora run` would choose now for the same config (cuts are chosen with uniform
importance, so no warm-up or training is needed). A run whose cuts differ was planned by an older
planner and should be trained again before its numbers are compared with new ones.

    .venv/bin/python benchmarks/study_cuts.py              # every regime, about 5 minutes on 2 cores
    .venv/bin/python benchmarks/study_cuts.py --regimes vi

Last line: RESULT cut_differences=<runs whose committed cuts today's planner would not choose>.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import FULL, regime_of, run_config, whole_model  # noqa: E402  (beside this script)

RUNS = Path(__file__).resolve().parent.parent / "docs" / "results" / "runs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", help="comma-separated regime names (default: every one with runs)")
    args = parser.parse_args(argv)
    import torch

    from hsplitlora.models.loading import load_model
    from hsplitlora.placement import Placement
    from hsplitlora.setup import build_setup

    warnings.filterwarnings("ignore")  # plans over a budget warn; the cuts are what is compared here
    torch.set_num_threads(1)
    loaded = load_model(FULL.model)
    cpu = torch.device("cpu")
    wanted = set(args.regimes.split(",")) if args.regimes else None
    differences = 0
    for folder in sorted(RUNS.glob("*/*/seed*")):
        regime, label, seed = folder.parent.parent.name, folder.parent.name, int(folder.name[4:])
        if whole_model(label) or (wanted and regime not in wanted) or not (folder / "metrics.jsonl").is_file():
            continue
        first = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
        trained = {c["client"]: c["split_point"] for c in first["clients"]}  # round 1's (sampled) clients
        config = run_config(FULL, regime_of(FULL, regime), label, seed, Path(tempfile.mkdtemp()))
        now = build_setup(config, Placement(cpu, cpu), loaded).strategy.initial_cuts()
        same = all(now[c] == s for c, s in trained.items())
        differences += not same
        print(f"{regime}/{label}/{seed}: committed {[trained[c] for c in sorted(trained)]}, today "
              f"{[now[c] for c in sorted(trained)]}{'' if same else '  DIFFERENT'}", flush=True)  # fmt: skip
    print(f"RESULT cut_differences={differences}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
