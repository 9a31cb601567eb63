"""The U-shaped split against the standard split on SmolLM2-135M: wall time and bytes per step.

One client cut after block 8, rank 8 on q, k, v, o of every block, batch 4 x 96 tokens; the
standard split sends the activations (with mask and labels) up and their gradient down, the
U-shaped split (tail of 1 block) sends four messages and keeps the head and loss on the client.
Both federations train in this process, their steps interleaved (one of each per round, 2 warm-up
steps each first), so machine load affects both alike. The compute is the same; what differs is
the extra cut's two messages and which role runs the head.

    .venv/bin/python benchmarks/u_shape.py [--steps 12]

Last line: RESULT u_shape_step_time_ratio=<median U step / median standard step> (no target set:
the U-shaped split buys label privacy, this says its price in time; its bytes ratio is printed).
"""

from __future__ import annotations

import argparse
import statistics
import time

from hsplitlora.config import RunConfig
from hsplitlora.models.loading import load_model
from hsplitlora.setup import fixed_federation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="timed steps per split mode (12)")
    args = parser.parse_args()
    federations = {}
    for mode in ("standard", "u"):
        config = RunConfig(model="smollm2-135m", clients=1, split_point=8, rank=8, batch_size=4, max_seq_len=96,
                           split_mode=mode, tail_blocks=1, seed=0)  # fmt: skip
        federations[mode] = fixed_federation(config, load_model(config.model, seed=0))
    times: dict[str, list[float]] = {mode: [] for mode in federations}
    for federation in federations.values():
        federation.engine.local_steps(2)  # warm-up
        federation.engine.reset_traffic()
    for _ in range(args.steps):
        for mode, federation in federations.items():
            started = time.perf_counter()
            federation.engine.local_steps(1)
            times[mode].append(time.perf_counter() - started)
    print(f"SmolLM2-135M, 1 client cut after block 8 (U-shaped: tail of 1 block), batch 4 x 96, {args.steps} steps")
    print(f"{'split':<9} {'median step s':>13} {'bytes per step':>15} {'up':>12} {'down':>12}")
    medians, per_step = {}, {}
    for mode, federation in federations.items():
        engine = federation.engine
        medians[mode] = statistics.median(times[mode])
        per_step[mode] = engine.step_bytes(0) / args.steps
        up, down = engine.bytes_up[0] / args.steps, engine.bytes_down[0] / args.steps
        print(f"{mode:<9} {medians[mode]:>13.3f} {per_step[mode]:>15,.0f} {up:>12,.0f} {down:>12,.0f}")
    print(f"bytes ratio (U / standard): {per_step['u'] / per_step['standard']:.3f}")
    print(f"RESULT u_shape_step_time_ratio={medians['u'] / medians['standard']:.3f}")


if __name__ == "__main__":
    main()
