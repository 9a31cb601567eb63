"""Frozen weights held in 8 or 4 bits (QLoRA-style), with bitsandbytes' kernels (CPU and GPU):

    int8: W ~ q * absmax_row / 127, q int8, one float32 absmax per output row
    nf4:  W ~ NF4[q] * absmax_block, q 4-bit codes packed two a byte, one float32 absmax per 64 values

bitsandbytes was chosen over torchao by measurement (docs/performance.md, "Quantized frozen
blocks"): as exact, faster to quantize and dequantize on the CPU, and any matrix shape (torchao's
NF4 needs the value count to divide by 64 x its scaler block). The product W x is computed from the
dequantized weight, one matrix at a time; backward keeps the quantized weight, never a float copy.
Adapters, anchors and optimizer state stay float32 (lora/layer.py).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hsplitlora.errors import UsageError

QUANT_KINDS = ("none", "int8", "nf4")
NF4_BLOCK = 64  # values per absmax in nf4 (QLoRA's block size)


def check_quant(value: str, what: str) -> str:
    """`value` if it is a quantization kind, else one sentence naming it and the valid ones."""
    if value not in QUANT_KINDS:
        raise UsageError(f"{what} {value!r} is unknown; choose {', '.join(QUANT_KINDS[:-1])} or {QUANT_KINDS[-1]}.")
    return value


def _functional():
    """bitsandbytes.functional, imported on first use (its import costs seconds; unquantized runs skip it)."""
    # Its CPU backend logs a warning about an optional fused kernel that the dequantize-then-matmul path never uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes.functional as bnb_functional

    return bnb_functional


@dataclass
class QuantizedWeight:
    """A (d_out, d_in) weight in `kind` bits; `dequantize` gives it back in `dtype`."""

    kind: str
    data: torch.Tensor  # int8 (d_out, d_in), or packed 4-bit codes
    scales: torch.Tensor  # float32 absmax per row (int8) or per block of 64 (nf4)
    state: object | None  # bitsandbytes' QuantState (nf4): the code book and shape
    shape: tuple[int, int]
    dtype: torch.dtype

    def dequantize(self) -> torch.Tensor:
        if self.kind == "int8":
            return (self.data.to(torch.float32) * (self.scales.unsqueeze(1) / 127)).to(self.dtype)
        return _functional().dequantize_4bit(self.data, self.state).reshape(self.shape).to(self.dtype)

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size() + self.scales.numel() * self.scales.element_size()


@torch.no_grad()
def quantize(weight: torch.Tensor, kind: str) -> QuantizedWeight:
    """`weight` (d_out, d_in) in `kind` bits (int8 or nf4), on its device."""
    functional = _functional()
    source = weight.detach().to(torch.float32).contiguous()
    shape = (source.shape[0], source.shape[1])
    if kind == "int8":
        # float16 in: bitsandbytes' CUDA kernel takes nothing else (CPU and GPU then agree to one rounding step)
        data, scales, _ = functional.int8_vectorwise_quant(source.to(torch.float16))
        return QuantizedWeight(kind, data, scales, None, shape, weight.dtype)
    if kind == "nf4":
        # One flat row: bitsandbytes 0.50.2's CPU path misquantizes 2-D weights whose rows are not a
        # multiple of 64 values (relative error 0.27 instead of 0.09 on a 96 x 80 matrix).
        data, state = functional.quantize_4bit(source.reshape(1, -1), blocksize=NF4_BLOCK, quant_type="nf4")
        return QuantizedWeight(kind, data, state.absmax, state, shape, weight.dtype)
    raise ValueError(f"no quantization {kind!r}")


def quantized_bytes(d_out: int, d_in: int, kind: str, dtype_bytes: int) -> int:
    """Bytes of a (d_out, d_in) weight held as `kind` (`dtype_bytes` each when not quantized)."""
    values = d_out * d_in
    if kind == "int8":
        return values + 4 * d_out
    if kind == "nf4":
        return math.ceil(values / 2) + 4 * math.ceil(values / NF4_BLOCK)
    return values * dtype_bytes


class _QuantizedLinear(torch.autograd.Function):
    """y = x W^T from a quantized W; backward dequantizes W again instead of saving a float copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
        ctx.weight = weight  # the quantized weight, not a saved float tensor
        return F.linear(x, weight.dequantize().to(x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.weight.dequantize().to(grad.dtype), None


def quantized_linear(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """x W^T with W held quantized (no bias); gradients flow to x only (W is frozen)."""
    return _QuantizedLinear.apply(x, weight)
