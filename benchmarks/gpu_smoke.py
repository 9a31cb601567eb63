"""GPU smoke run: a few rounds with the main server on `cuda` (clients on the CPU, as a deployment
would place them), against the same rounds all on the CPU, for each strategy asked (the U-shape
too); every train and validation loss must agree to 1e-3 in float32 (to --tolerance in another
dtype). Where torch sees no GPU it says so and exits 0.

    .venv/bin/python benchmarks/gpu_smoke.py                  # the tiny model, hsplitlora
    .venv/bin/python benchmarks/gpu_smoke.py --strategies hsplitlora,splitlora,splitlora-u,hetlora,flexlora
    .venv/bin/python benchmarks/gpu_smoke.py --model smollm2-135m --steps 5

Last line: RESULT gpu_smoke_max_abs_loss_diff=<max |loss_gpu - loss_cpu| over the strategies>,
or RESULT gpu_smoke=skipped (no GPU here)."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def _losses(args, strategy: str, client: str, server: str, folder: Path) -> tuple[list[float], float]:
    """One short run; its per-round train and validation losses and its wall-clock seconds."""
    from hsplitlora.config import RunConfig
    from hsplitlora.rounds import run

    name = strategy.removesuffix("-u")
    budgets = "8MB,16MB,32MB" if args.model.startswith("tiny") else "600MB,1GB,2GB"
    config = RunConfig(model=args.model, strategy=name, split_mode="u" if strategy.endswith("-u") else "standard",
                       clients=3, budgets=budgets, rounds=args.rounds, local_steps=args.steps, val_size=16,
                       batch_size=4, dtype=args.dtype, client_device=client, server_device=server,
                       output_dir=str(folder))  # fmt: skip
    started = time.perf_counter()
    metrics = run(config).metrics
    return [m["train_loss"] for m in metrics] + [m["val_loss"] for m in metrics], time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--strategies", default="hsplitlora",
                        help="comma-separated; NAME-u runs NAME U-shaped (default hsplitlora)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="local steps per round (3)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tolerance", type=float, default=None, help="default 1e-3 in float32, 5e-2 otherwise")
    parser.add_argument("--server-device", default="cuda")
    parser.add_argument("--client-device", default="cpu")
    args = parser.parse_args()
    tolerance = args.tolerance if args.tolerance is not None else (1e-3 if args.dtype == "float32" else 5e-2)

    import torch

    wants_cuda = any(device.startswith("cuda") for device in (args.client_device, args.server_device))
    if wants_cuda and not torch.cuda.is_available():
        print(f"no GPU here: torch {torch.__version__} sees no CUDA device, so there is nothing to compare; "
              "run this on a machine with a GPU and a CUDA build of torch.")  # fmt: skip
        print("RESULT gpu_smoke=skipped")
        return 0

    gpu = torch.cuda.get_device_name() if wants_cuda else "no GPU"
    print(f"{args.model} in {args.dtype}: clients on {args.client_device}, main server on {args.server_device} "
          f"({gpu}), {args.rounds} rounds x {args.steps} steps, tolerance {tolerance:g}")  # fmt: skip
    worst = 0.0
    with tempfile.TemporaryDirectory() as folder:
        for strategy in args.strategies.split(","):
            cpu, cpu_s = _losses(args, strategy, "cpu", "cpu", Path(folder) / f"{strategy}-cpu")
            where = (args.client_device, args.server_device)
            gpu, gpu_s = _losses(args, strategy, *where, Path(folder) / f"{strategy}-gpu")
            diff = max(abs(a - b) for a, b in zip(cpu, gpu, strict=True))
            worst = max(worst, diff)
            print(
                f"  {strategy}: max diff {diff:.2e} over {len(cpu)} losses (last val cpu {cpu[-1]:.6f}, "
                f"gpu {gpu[-1]:.6f}); wall cpu {cpu_s:.1f} s, gpu {gpu_s:.1f} s"
            )
    print(f"RESULT gpu_smoke_max_abs_loss_diff={worst:.2e}")
    return 0 if worst <= tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
