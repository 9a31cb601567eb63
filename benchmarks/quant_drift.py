"""Drift of quantized frozen weights over rounds of merges, against the float weights.

Each round merges an aggregated low-rank update dW_k (rank 8, ||dW_k|| = SIZE ||W_0||) into SmolLM2-135M's
q, k, v, o, gate, up and down weights of block 15, held two ways:

    master:    a float W_k = W_{k-1} + dW_k kept; computed from Q(W_k), quantized afresh   (what hsplitlora does)
    requant:   only H_k = deq(Q(deq(H_{k-1}) + dW_k)) kept; each merge rounds again          (a device holding
               only quantized weights: MultiLoRALayer.hold_quantized)

For each, after each round: the error ||deq - W_k|| / ||W_k|| against the float weights, and the share of
the accumulated update the held weight carries, <deq_k - deq_0, W_k - W_0> / ||W_k - W_0||^2 (1: all of it;
below 1: merges lost to rounding).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_drift.py

RESULT lines: quant_drift_<kind>_<path>_rel_error (after the last round at SIZE 1e-3) and
quant_drift_<kind>_<path>_update_kept.
"""

from __future__ import annotations

import argparse

import torch

ROUNDS = 10
SIZES = (1e-4, 1e-3, 1e-2)
BLOCK = 15


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    args = parser.parse_args()
    torch.set_num_threads(1)

    from hsplitlora.lora.quant import quantize
    from hsplitlora.models.loading import load_model

    model = load_model("smollm2-135m").model
    block = model.model.layers[BLOCK]
    weights = [m.weight.detach().clone() for m in block.modules() if isinstance(m, torch.nn.Linear)]
    generator = torch.Generator().manual_seed(0)
    print(f"SmolLM2-135M block {BLOCK}: {len(weights)} weights, {sum(w.numel() for w in weights) / 1e6:.2f} M values, "
          f"{args.rounds} rounds of rank-8 updates")  # fmt: skip
    print(f"{'kind':>5} {'size':>7} {'path':>8} " + " ".join(f"{'r' + str(r):>7}" for r in range(1, args.rounds + 1))
          + "   update kept")  # fmt: skip
    for kind in ("int8", "nf4"):
        for size in SIZES:
            master = [w.clone() for w in weights]
            held = [quantize(w, kind).dequantize() for w in weights]
            start = [h.clone() for h in held]
            errors = {"master": [], "requant": []}
            kept = {}
            for _ in range(args.rounds):
                for i, w in enumerate(weights):
                    left = torch.randn(w.shape[0], 8, generator=generator)
                    right = torch.randn(8, w.shape[1], generator=generator)
                    delta = left @ right
                    delta *= size * w.norm() / delta.norm()
                    master[i] += delta
                    held[i] = quantize(held[i] + delta, kind).dequantize()
                computed = {"master": [quantize(m, kind).dequantize() for m in master], "requant": held}
                for path, values in computed.items():
                    error = sum(float((v - m).norm() ** 2) for v, m in zip(values, master, strict=True))
                    errors[path].append((error / sum(float(m.norm() ** 2) for m in master)) ** 0.5)
                    moved = sum(float(((v - s) * (m - w)).sum()) for v, s, m, w in zip(values, start, master, weights,
                                                                                      strict=True))  # fmt: skip
                    kept[path] = moved / sum(float((m - w).norm() ** 2) for m, w in zip(master, weights, strict=True))
            for path in ("master", "requant"):
                row = " ".join(f"{e:7.4f}" for e in errors[path])
                print(f"{kind:>5} {size:7.0e} {path:>8} {row}   {kept[path]:.3f}", flush=True)
                if size == 1e-3:
                    print(f"RESULT quant_drift_{kind}_{path}_rel_error={errors[path][-1]:.4f}")
                    print(f"RESULT quant_drift_{kind}_{path}_update_kept={kept[path]:.3f}")


if __name__ == "__main__":
    main()
