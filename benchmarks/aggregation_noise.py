"""How far factor averaging lands from the exact aggregate in a real run: the "noise" NAA removes.

It runs a strategy that averages A and B (SplitLoRA, or FedLoRA without split) with the study's
settings for one regime and seed, and at every aggregation compares,
for every candidate matrix, what the averaged factors imply with the exact weighted mean of the
clients' adapters:

    exact    = sum_i p_i s_i B_i A_i                 (what NAA would merge: the mean of the products)
    averaged = (sum_i p_i s_i B_i)(sum_i p_i A_i)     (FedAvg: what every client starts the next round from)
    noise    = |averaged - exact|_F / |exact - start|_F

`start` is the product every client began the round from (the previous broadcast; zero in round
1), so the noise is relative to this round's update. With a common start the cross terms are
second order in the clients' local changes: the ratio says how much of a round's update FedAvg
gets wrong at this round length, learning rate and data split.

    .venv/bin/python benchmarks/aggregation_noise.py --regime iv --rounds 2
    .venv/bin/python benchmarks/aggregation_noise.py --regime ii --strategy fedlora

Last line: RESULT fedavg_noise_relative=<median over candidates and rounds>.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from study import FULL, regime_of, run_config  # benchmarks/study.py, beside this script


def measure(regime: str, strategy: str, seed: int, rounds: int, threads: int | None) -> list[list[float]]:
    """Per round, the noise of every candidate (see the module's docstring)."""
    from hsplitlora.method.aggregation import sample_weights
    from hsplitlora.roles.fed_server import FedServer
    from hsplitlora.rounds import run

    per_round: list[list[float]] = []
    start: dict[str, torch.Tensor] = {}
    original = FedServer.aggregate

    def observed(self, round_, uploads):
        result = original(self, round_, uploads)
        noises = []
        for name, factors in self.by_candidate(uploads).items():
            weights = sample_weights(factors)
            exact = sum(w * f.scale * (f.b @ f.a) for w, f in zip(weights, factors, strict=True))
            a, scaled_b = result.factors[name]
            averaged = scaled_b @ a
            before = start.get(name, torch.zeros_like(exact))
            change = float(torch.linalg.norm(exact - before))
            if change > 0:
                noises.append(float(torch.linalg.norm(averaged - exact)) / change)
            start[name] = averaged
        per_round.append(noises)
        return result

    config = run_config(FULL, regime_of(FULL, regime), strategy, seed, Path(tempfile.mkdtemp(prefix="noise-")))
    config.rounds, config.threads = rounds, threads
    FedServer.aggregate = observed
    try:
        run(config, log=lambda message: None, overwrite=True)
    finally:
        FedServer.aggregate = original
    return per_round


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--regime", default="iv", help="a regime of the study (i, ii, iii, iv)")
    parser.add_argument("--strategy", default="splitlora", choices=("splitlora", "fedlora"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    per_round = measure(args.regime, args.strategy, args.seed, args.rounds, args.threads)
    print(f"{args.strategy}, regime {args.regime}, seed {args.seed}: |averaged - exact| / |round's update|")
    for index, noises in enumerate(per_round, 1):
        quartiles = statistics.quantiles(noises, n=4)
        print(f"  round {index}: {len(noises)} matrices, median {statistics.median(noises):.4f}, "
              f"quartiles {quartiles[0]:.4f}-{quartiles[2]:.4f}, max {max(noises):.4f}")  # fmt: skip
    every = [n for noises in per_round for n in noises]
    print(f"RESULT fedavg_noise_relative={statistics.median(every):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
