"""Which library holds the quantized frozen weights: torchao 0.18.0 or bitsandbytes 0.50.2, side by
side on SmolLM2-135M-shaped matrices (576 x 576, 192 x 576, 1536 x 576, 576 x 1536; random values of
scale 0.02), one CPU thread: time to quantize and to dequantize the four, bytes against float32, and
the relative error of the weights and of x W^T for 1024 random tokens.

bitsandbytes is the project's dependency; torchao is not (install it by hand to compare:
`.venv/bin/python -m pip install torchao==0.18.0`, which leaves torch as it is). A library that is
not installed is reported as such.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/quant_library.py
"""

from __future__ import annotations

import logging
import time
import warnings

import torch

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


def torchao_kinds() -> dict:
    from torchao.quantization import Int8Tensor, to_nf4
    from torchao.quantization.granularity import PerRow

    def nf4_bytes(q) -> int:
        return (q.quantized_data.numel() + q.quantized_scalers.numel()
                + 4 * (q.quantization_factor.numel() + q.scaler_mean.numel() + q.nf4.numel()))  # fmt: skip

    return {
        # NF4's scaler block must divide the block count: 64 where QLoRA's 256 does not fit 192 x 576
        "torchao int8": (lambda w: Int8Tensor.from_hp(w, PerRow()), lambda q: q.dequantize(torch.float32),
                         lambda q: q.qdata.numel() + 4 * q.scale.numel()),
        "torchao nf4": (lambda w: to_nf4(w, 64, 64), lambda q: q.get_original_weight(), nf4_bytes),
    }  # fmt: skip


def bitsandbytes_kinds() -> dict:
    import bitsandbytes.functional as bnb

    def int8_dequantize(q) -> torch.Tensor:
        return q[0].float() * (q[1].unsqueeze(1) / 127)

    return {
        "bitsandbytes int8": (bnb.int8_vectorwise_quant, int8_dequantize, lambda q: q[0].numel() + 4 * q[1].numel()),
        "bitsandbytes nf4": (lambda w: bnb.quantize_4bit(w, blocksize=64, quant_type="nf4"),
                             lambda q: bnb.dequantize_4bit(q[0], q[1]),
                             lambda q: q[0].numel() + 4 * q[1].absmax.numel()),
    }  # fmt: skip


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    weights = [torch.randn(*shape, generator=generator) * 0.02 for shape in SHAPES]
    x = torch.randn(1024, max(s[1] for s in SHAPES), generator=generator)
    kinds = {}
    for name, build in (("torchao", torchao_kinds), ("bitsandbytes", bitsandbytes_kinds)):
        try:
            kinds.update(build())
        except ImportError:
            print(f"{name} is not installed")
    for name, (quantize, dequantize, nbytes) in kinds.items():
        quantized = [quantize(w) for w in weights]
        start = time.perf_counter()
        for _ in range(5):
            [quantize(w) for w in weights]
        quantize_ms = (time.perf_counter() - start) / 5 * 1e3
        start = time.perf_counter()
        for _ in range(20):
            [dequantize(q) for q in quantized]
        dequantize_ms = (time.perf_counter() - start) / 20 * 1e3
        weight_error = max(
            float((dequantize(q) - w).norm() / w.norm()) for q, w in zip(quantized, weights, strict=True)
        )
        output_error = max(
            float((x[:, : w.shape[1]] @ (dequantize(q) - w).T).norm() / (x[:, : w.shape[1]] @ w.T).norm())
            for q, w in zip(quantized, weights, strict=True)
        )
        ratio = sum(nbytes(q) for q in quantized) / sum(4 * w.numel() for w in weights)
        print(f"{name:18s} quantize {quantize_ms:7.1f} ms  dequantize {dequantize_ms:6.1f} ms  bytes/float32 "
              f"{ratio:.4f}  weight error {weight_error:.4f}  output error {output_error:.4f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
