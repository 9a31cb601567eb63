"""Compressed tensors across the cut: activations and their gradients as float32 (default),
float16, bfloat16 or int8 with one absmax scale per token.

- fp32: sent as is (4 bytes per value).
- fp16: divided by the tensor's absmax (one float32 scale) and cast, so that small gradients do
  not underflow float16's range; relative error per value <= 2^-11 of the tensor's absmax
  (rounding), 2 bytes per value.
- bf16: cast (float32's exponent range, 8 bits of mantissa): relative error <= 2^-8 per value.
- int8: per token (the last dimension), scale = absmax / 127 as float32, q = round(x / scale);
  the round trip error per value is at most scale / 2 = absmax_token / 254. 1 byte per value plus
  4 bytes per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplitlora.config import DEFAULT_COMPRESSION

MODES = ("fp32", "fp16", "bf16", "int8")
VALUE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "int8": 1}  # per value, scales aside


@dataclass
class Packed:
    """A tensor as it crosses the network: its payload and, for fp16 and int8, float32 scales."""

    mode: str
    data: torch.Tensor
    scale: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    def nbytes(self) -> int:
        total = self.data.numel() * self.data.element_size()
        return total + (self.scale.numel() * self.scale.element_size() if self.scale is not None else 0)

    def unpack(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The tensor the receiver computes with: in its weights' dtype (float32 by default), on its
        device (where it was sent from by default)."""
        device = device if device is not None else self.data.device
        if self.mode == "fp32":
            return self.data.to(device=device, dtype=dtype)
        values = self.data.to(device).float()
        scale = self.scale.to(device) if self.scale is not None else None
        return (values * scale if scale is not None else values).to(dtype)


def check_mode(mode: str) -> str:
    if mode not in MODES:
        from hsplitlora.errors import UsageError

        raise UsageError(f"compression {mode!r} is unknown; choose one of {', '.join(MODES)}.")
    return mode


@torch.no_grad()
def pack(tensor: torch.Tensor, mode: str = DEFAULT_COMPRESSION) -> Packed:
    """Compress a float tensor for sending (detached; the sender keeps its own graph)."""
    tensor = tensor.detach()
    if mode == "fp32":
        return Packed(mode, tensor.float())
    if mode == "bf16":
        return Packed(mode, tensor.to(torch.bfloat16))
    if mode == "fp16":
        scale = tensor.abs().amax().float().clamp_min(torch.finfo(torch.float32).tiny).reshape(1)
        return Packed(mode, (tensor / scale).to(torch.float16), scale)
    if mode == "int8":
        scale = (tensor.abs().amax(dim=-1, keepdim=True).float() / 127).clamp_min(torch.finfo(torch.float32).tiny)
        return Packed(mode, torch.round(tensor / scale).clamp_(-127, 127).to(torch.int8), scale)
    check_mode(mode)
    raise AssertionError("unreachable")


@torch.no_grad()
def pack_with_scale(tensor: torch.Tensor, mode: str, scale: torch.Tensor | None) -> Packed:
    """`pack`'s payload for a slice of a tensor whose scales `pack` already chose (fp16: the whole
    tensor's; int8: the slice's rows'): a receiver that holds these values itself compresses them
    exactly as the sender compressed the whole."""
    tensor = tensor.detach()
    if mode in ("fp32", "bf16"):
        return pack(tensor, mode)
    if mode == "fp16":
        return Packed(mode, (tensor / scale).to(torch.float16), scale)
    return Packed(mode, torch.round(tensor / scale).clamp_(-127, 127).to(torch.int8), scale)
