"""Ray engine overhead: seconds per training step (every client's split step) with the Ray engine on
localhost against the in-process engine, same model, clients, cuts, ranks and batches, run side
by side in one script (the first step of each, which warms up, is not timed).

    .venv/bin/python benchmarks/ray_overhead.py [--model smollm2-135m] [--clients 2] [--steps 6]

Last line: RESULT ray_overhead_ratio=<Ray s/step divided by in-process s/step> (target <= 1.3).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from hsplitlora.config import RunConfig
from hsplitlora.rounds import Reporter, run


class StepClock(Reporter):
    def __init__(self):
        self.times: list[float] = []

    def step(self, round_, step, losses):
        self.times.append(time.perf_counter())

    def seconds_per_step(self) -> float:
        gaps = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]
        return sum(gaps) / len(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--split-point", type=int, default=8)
    args = parser.parse_args()
    rates = {}
    for engine in ("inprocess", "ray"):
        clock = StepClock()
        with tempfile.TemporaryDirectory() as folder:
            config = RunConfig(model=args.model, engine=engine, clients=args.clients, rounds=1,
                               local_steps=args.steps, split_point=args.split_point, rank=8, val_size=8,
                               budgets="4GB", output_dir=folder)  # fmt: skip
            run(config, reporter=clock)
        rates[engine] = clock.seconds_per_step()
        print(f"{engine:>9}: {rates[engine]:.3f} s per step of {args.clients} clients", flush=True)
    print(f"model {args.model}, {args.clients} clients, split point {args.split_point}, rank 8, batch 8; "
          f"{args.steps - 1} timed steps each")  # fmt: skip
    print(f"RESULT ray_overhead_ratio={rates['ray'] / rates['inprocess']:.3f}")


if __name__ == "__main__":
    main()
