"""GPU smoke run: 2 rounds with the main server on `cuda` (clients on the CPU, as a deployment
would place them), against the same 2 rounds all on the CPU; every train and validation loss must
agree to 1e-3 in float32. Where torch sees no GPU it says so and exits 0.

    .venv/bin/python benchmarks/gpu_smoke.py                  # the tiny model
    .venv/bin/python benchmarks/gpu_smoke.py --model smollm2-135m --steps 5

Last line: RESULT gpu_smoke_max_abs_loss_diff=<max |loss_gpu - loss_cpu|> (target <= 1e-3), or
RESULT gpu_smoke=skipped (no GPU here)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=3, help="local steps per round (3)")
    parser.add_argument("--server-device", default="cuda")
    parser.add_argument("--client-device", default="cpu")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(f"no GPU here: torch {torch.__version__} sees no CUDA device, so there is nothing to compare; "
              "run this on a machine with a GPU and a CUDA build of torch.")  # fmt: skip
        print("RESULT gpu_smoke=skipped")
        return 0

    from hsplitlora.config import RunConfig
    from hsplitlora.rounds import run

    losses, seconds = {}, {}
    with tempfile.TemporaryDirectory() as folder:
        for name, client, server in (("cpu", "cpu", "cpu"), ("gpu", args.client_device, args.server_device)):
            budgets = "8MB,16MB,32MB" if args.model.startswith("tiny") else "600MB,1GB,2GB"
            config = RunConfig(model=args.model, clients=3, budgets=budgets, rounds=2, local_steps=args.steps,
                               val_size=16, batch_size=4, client_device=client, server_device=server,
                               output_dir=str(Path(folder) / name))  # fmt: skip
            started = time.perf_counter()
            metrics = run(config).metrics
            seconds[name] = time.perf_counter() - started
            losses[name] = [m["train_loss"] for m in metrics] + [m["val_loss"] for m in metrics]
    print(f"{args.model}: clients on {args.client_device}, main server on {args.server_device} "
          f"({torch.cuda.get_device_name()}), 2 rounds x {args.steps} steps")  # fmt: skip
    for label, cpu, gpu in zip(("train r1", "train r2", "val r1", "val r2"), losses["cpu"], losses["gpu"], strict=True):
        print(f"  {label}: cpu {cpu:.6f}  gpu {gpu:.6f}  diff {abs(cpu - gpu):.2e}")
    print(f"  wall: cpu {seconds['cpu']:.1f} s, gpu {seconds['gpu']:.1f} s")
    worst = max(abs(a - b) for a, b in zip(losses["cpu"], losses["gpu"], strict=True))
    print(f"RESULT gpu_smoke_max_abs_loss_diff={worst:.2e}")
    return 0 if worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
