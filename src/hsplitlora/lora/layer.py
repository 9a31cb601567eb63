"""A frozen linear map with several named LoRA adapters of their own ranks.

    y = W x + b + (alpha / r_a) * (B_a A_a - B0_a A0_a) x          for the one active adapter a

(or alpha / sqrt(r_a) with rank-stabilised scaling, `lora_scale`).

(B0, A0) is the adapter's *anchor* (method.md section 6, persistent adapters): the factors it had
when W last absorbed the federation's update, so that at that moment every holder computes exactly
W. An adapter without an anchor has B0 A0 = 0.

A fused module (GPT-2's `c_attn`, [q | k | v] along the output) is split into *slots*: each slot
is its own candidate matrix with its own adapter, so q, k and v can get different ranks.
The layer knows nothing about clients or servers: adapters are just names.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from hsplitlora.lora.quant import QuantizedWeight, quantize, quantized_linear

SCALINGS = ("standard", "rslora")


def lora_scale(alpha: float, rank: int, scaling: str = "standard") -> float:
    """The factor of B A: alpha / r (LoRA's, method.md section 2), or alpha / sqrt(r) (rank-stabilised
    LoRA, Kalajdzievski 2023; peft's use_rslora), under which an update of B moves B A by the same
    amount at every rank, so a higher rank does not learn more slowly at the same learning rate."""
    if scaling == "rslora":
        return alpha / math.sqrt(rank)
    if scaling != "standard":
        raise ValueError(f"LoRA scaling {scaling!r} is unknown; choose {' or '.join(SCALINGS)}")
    return alpha / rank


MAIN_SLOT = "main"
ADAPTER_DTYPE = torch.float32  # adapters, their anchors and optimizer state, whatever the frozen W's dtype


def _kaiming_rows(rows: int, columns: int, generator: torch.Generator | None) -> torch.Tensor:
    """A fresh A: Kaiming-uniform rows drawn on the generator's device (the CPU for the seeded
    generators the roles hold), so a seed gives the same A wherever the layer lives; the caller
    moves it to the layer's device."""
    a = torch.empty(rows, columns, dtype=ADAPTER_DTYPE, device=generator.device if generator is not None else "cpu")
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a


class MultiLoRALayer(nn.Module):
    def __init__(self, base: nn.Module, slot_sizes: dict[str, int] | None = None):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.transposed = False
            d_out, d_in = base.weight.shape
        elif isinstance(base, Conv1D):
            self.transposed = True  # Conv1D stores W as (d_in, d_out): y = x @ W + b
            d_in, d_out = base.weight.shape
        else:
            raise TypeError(f"LoRA supports nn.Linear and Conv1D, not {type(base).__name__}")
        self.base = base
        self.in_features = d_in
        self.out_features = d_out
        slot_sizes = slot_sizes or {MAIN_SLOT: d_out}
        if sum(slot_sizes.values()) != d_out:
            raise ValueError(f"slot sizes {slot_sizes} do not add up to the output size {d_out}")
        self.slot_bounds: dict[str, tuple[int, int]] = {}
        start = 0
        for slot, size in slot_sizes.items():
            self.slot_bounds[slot] = (start, start + size)
            start += size
        self.lora_A = nn.ModuleDict({slot: nn.ParameterDict() for slot in self.slot_bounds})
        self.lora_B = nn.ModuleDict({slot: nn.ParameterDict() for slot in self.slot_bounds})
        self.scaling: dict[tuple[str, str], float] = {}
        self.anchors: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (A0, B0), no gradient
        self.active_adapter: str | None = None
        # Importance probe: one unit gate g per slot, y = g * (W x) + b. Its gradient is
        # dL/dg = sum over tokens <dL/dy, W x> = sum_j w_j dL/dw_j, without any weight gradient.
        self.importance_gate: torch.Tensor | None = None
        # How the next forward computes W x: none (the float W) or int8 / nf4 (W quantized). The
        # part that runs the layer sets it, as it sets the active adapter: holders of a shared
        # block may differ (a client's nf4 front, the main server's float copy of the same block).
        self.quant = "none"
        self._quantized: dict[str, tuple[tuple, QuantizedWeight]] = {}  # kind -> (W's version, Q(W))
        self.held: QuantizedWeight | None = None  # W kept only quantized (hold_quantized): no float W
        # DP-SGD (privacy/dp.py): per adapter, each training forward's (slot, x, x A^T, dL/d(B A x)),
        # from which the per-example gradients of A and B follow in closed form; None: not kept.
        self.per_example: dict[str, list[list]] | None = None

    # -- adapters -------------------------------------------------------------------------------
    def set_adapter(
        self,
        name: str,
        slot: str,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
        scaling: str = "standard",
    ) -> None:
        """(Re)create adapter `name` on `slot` fresh: A Kaiming-uniform, B = 0, scale
        `lora_scale(alpha, rank, scaling)`; rank 0 removes it."""
        self.remove_adapter(name, slot)
        if rank == 0:
            return
        if rank < 0:
            raise ValueError(f"rank must be >= 0, got {rank}")
        lo, hi = self.slot_bounds[slot]
        device = self.base.weight.device
        a = _kaiming_rows(rank, self.in_features, generator).to(device)
        b = torch.zeros(hi - lo, rank, dtype=ADAPTER_DTYPE, device=device)
        self.lora_A[slot][name] = nn.Parameter(a)
        self.lora_B[slot][name] = nn.Parameter(b)
        self.scaling[(name, slot)] = lora_scale(alpha, rank, scaling)

    def remove_adapter(self, name: str, slot: str | None = None) -> None:
        for one in [slot] if slot is not None else list(self.slot_bounds):
            if name in self.lora_A[one]:
                del self.lora_A[one][name]
                del self.lora_B[one][name]
                del self.scaling[(name, one)]
            self.anchors.pop((name, one), None)

    @torch.no_grad()
    def set_anchor(self, name: str, slot: str) -> None:
        """Anchor adapter `name` at its current factors: from now on it adds s (B A - B0 A0) = 0
        until it trains again."""
        a, b = self.lora_A[slot][name], self.lora_B[slot][name]
        self.anchors[(name, slot)] = (a.detach().clone(), b.detach().clone())

    def anchor(self, name: str, slot: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A0, B0) of an anchored adapter, else None."""
        return self.anchors.get((name, slot))

    @torch.no_grad()
    def resize_adapter(
        self, name: str, slot: str, rank: int, alpha: float, generator: torch.Generator | None = None,
        scaling: str = "standard",
    ) -> None:  # fmt: skip
        """Give adapter `name` rank `rank` keeping s B A (s = lora_scale(alpha, r, scaling)): grow
        appends random rows to A and zero columns to B; shrink keeps the best rank-r factorisation of
        s B A. An anchored
        adapter is re-anchored at its new factors (it was at its anchor: the output is unchanged).
        No adapter yet: a fresh one; rank 0: removed."""
        current = self.rank(name, slot)
        if rank == current:
            return
        if current == 0 or rank == 0:
            anchored = (name, slot) in self.anchors
            self.set_adapter(name, slot, rank, alpha, generator, scaling)
            if anchored and rank:
                self.set_anchor(name, slot)
            return
        from hsplitlora.method.aggregation import low_rank_factors  # the one SVD of stacked factors

        a, b = self.lora_A[slot][name], self.lora_B[slot][name]
        old_scale, new_scale = self.scaling[(name, slot)], lora_scale(alpha, rank, scaling)
        if rank > current:
            extra = _kaiming_rows(rank - current, self.in_features, generator).to(a.device)
            new_a = torch.cat([a.detach(), extra])
            new_b = torch.cat([b.detach() * (old_scale / new_scale), b.new_zeros(b.shape[0], rank - current)], dim=1)
        else:
            left, right = low_rank_factors(old_scale * b.detach(), a.detach(), rank)
            new_b, new_a = left / new_scale, right
        anchored = (name, slot) in self.anchors
        self.lora_A[slot][name] = nn.Parameter(new_a.contiguous())
        self.lora_B[slot][name] = nn.Parameter(new_b.contiguous())
        self.scaling[(name, slot)] = new_scale
        if anchored:
            self.set_anchor(name, slot)

    def rank(self, name: str, slot: str) -> int:
        return self.lora_A[slot][name].shape[0] if name in self.lora_A[slot] else 0

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for slot in self.slot_bounds:
            if name in self.lora_A[slot]:
                params += [self.lora_A[slot][name], self.lora_B[slot][name]]
        return params

    def factors(self, name: str, slot: str) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """(A, B, alpha / r) of an adapter, or None when it has none on this slot."""
        if name not in self.lora_A[slot]:
            return None
        return self.lora_A[slot][name], self.lora_B[slot][name], self.scaling[(name, slot)]

    def delta(self, name: str, slot: str) -> torch.Tensor:
        """What the adapter adds to W, (alpha / r) (B A - B0 A0), dense (d_out_slot, d_in)."""
        found = self.factors(name, slot)
        lo, hi = self.slot_bounds[slot]
        if found is None:
            return torch.zeros(hi - lo, self.in_features, dtype=ADAPTER_DTYPE, device=self.base.weight.device)
        a, b, scale = found
        anchor = self.anchor(name, slot)
        return scale * (b @ a - (anchor[1] @ anchor[0] if anchor is not None else 0))

    # -- the frozen weight ----------------------------------------------------------------------
    def weight(self, slot: str) -> torch.Tensor:
        """The frozen weight of one slot as a (d_out_slot, d_in) view (a dequantized copy when the
        layer holds W only quantized)."""
        lo, hi = self.slot_bounds[slot]
        if self.held is not None:
            return self.held.dequantize()[lo:hi]
        if self.transposed:
            return self.base.weight[:, lo:hi].T
        return self.base.weight[lo:hi]

    @torch.no_grad()
    def merge(self, slot: str, delta: torch.Tensor) -> None:
        """W <- W + delta for one slot; delta has shape (d_out_slot, d_in)."""
        weight = self.base.weight
        if self.held is not None:  # dequantize, add, quantize again: each merge rounds anew
            self.set_weight(slot, self.weight(slot) + delta.to(device=weight.device, dtype=self.held.dtype))
            return
        self.weight(slot).add_(delta.to(device=weight.device, dtype=weight.dtype))

    @torch.no_grad()
    def set_weight(self, slot: str, value: torch.Tensor) -> None:
        """W[slot] <- value, (d_out_slot, d_in)."""
        if self.held is None:
            self.weight(slot).copy_(value)
            return
        lo, hi = self.slot_bounds[slot]
        full = self.held.dequantize()
        full[lo:hi] = value.to(device=full.device, dtype=full.dtype)
        self.held = quantize(full, self.held.kind)

    # -- quantized W -----------------------------------------------------------------------------
    def quantized(self, kind: str) -> QuantizedWeight:
        """W (d_out, d_in) in `kind` bits: the held weight, or the float W quantized when it last
        changed (a merge or a weight load bumps its version; re-quantized from the float W, so no
        rounding accumulates over rounds)."""
        if self.held is not None:
            if self.held.kind != kind:
                raise ValueError(f"this layer holds its weight as {self.held.kind}, not {kind}")
            return self.held
        weight = self.base.weight
        key = (weight._version, weight.data_ptr(), weight.device)
        cached = self._quantized.get(kind)
        if cached is None or cached[0] != key:
            cached = (key, quantize(weight.detach().T if self.transposed else weight.detach(), kind))
            self._quantized[kind] = cached
        return cached[1]

    @torch.no_grad()
    def hold_quantized(self, kind: str) -> None:
        """Keep W only in `kind` bits and free the float W: what a device whose every role computes
        with `kind` holds. Merges then dequantize, add and quantize again, which rounds away most
        of an update smaller than the quantization step (benchmarks/quant_drift.py: 98% of int8's
        and nf4's at ||dW|| = 1e-3 ||W||), so runs keep the float W as the master instead."""
        if self.held is not None:
            return
        self.held = self.quantized(kind)
        self._quantized.clear()
        self.base.weight = nn.Parameter(self.base.weight.new_empty(0), requires_grad=False)
        self.quant = kind

    def frozen_bytes(self) -> int:
        """Bytes of W as this layer holds it: float, or only quantized, plus its cached quantized copies."""
        weight = self.base.weight
        own = self.held.nbytes if self.held is not None else weight.numel() * weight.element_size()
        return own + sum(q.nbytes for _, q in self._quantized.values())

    # -- importance probe -----------------------------------------------------------------------
    def track_importance(self, enabled: bool) -> None:
        """Turn the unit gates on (a fresh zero gradient) or off."""
        if enabled:
            weight = self.base.weight
            self.importance_gate = torch.ones(
                len(self.slot_bounds), dtype=weight.dtype, device=weight.device, requires_grad=True
            )
        else:
            self.importance_gate = None

    def take_importance(self) -> dict[str, float]:
        """sum_j w_j dL/dw_j per slot, accumulated since the last call; resets the accumulator."""
        gate = self.importance_gate
        if gate is None or gate.grad is None:
            return dict.fromkeys(self.slot_bounds, 0.0)
        values = gate.grad.tolist()
        gate.grad = None
        return dict(zip(self.slot_bounds, values, strict=True))

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.importance_gate
        kind = self.held.kind if self.held is not None else self.quant
        if gate is None and kind == "none":
            return self.base(x)
        weight, bias = self.base.weight, self.base.bias
        if kind != "none":
            wx = quantized_linear(x, self.quantized(kind))
            if gate is None:
                return wx if bias is None else wx + bias
        else:
            wx = x @ weight if self.transposed else F.linear(x, weight)
        sizes = [hi - lo for lo, hi in self.slot_bounds.values()]
        scale = gate[0] if len(sizes) == 1 else torch.repeat_interleave(gate, torch.tensor(sizes, device=gate.device))
        out = wx * scale
        return out if bias is None else out + bias

    # -- per-example gradients (DP-SGD) ----------------------------------------------------------
    def record_per_example(self, enabled: bool) -> None:
        """Keep, from now on, what the per-example gradients of the active adapter need (or stop)."""
        self.per_example = {} if enabled else None

    def take_per_example(self, name: str) -> list[list]:
        """The records of adapter `name` since the last call, each [slot, x, x A^T, dL/d(B A x)]
        with its gradient filled in by the backward pass (records without one are dropped)."""
        if self.per_example is None:
            return []
        return [record for record in self.per_example.pop(name, []) if record[3] is not None]

    def _record(self, name: str, slot: str, x: torch.Tensor, u: torch.Tensor, update: torch.Tensor) -> None:
        record = [slot, x.detach(), u.detach(), None]
        self.per_example.setdefault(name, []).append(record)

        def keep(grad: torch.Tensor) -> None:
            record[3] = grad.detach()

        update.register_hook(keep)

    # -- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_forward(x)
        name = self.active_adapter
        if name is None:
            return out
        updates = {}
        xa = x.to(ADAPTER_DTYPE)  # bfloat16 / float16 frozen weights: the adapters compute in float32
        for slot in self.slot_bounds:
            if name in self.lora_A[slot]:
                a, b = self.lora_A[slot][name], self.lora_B[slot][name]
                u = F.linear(xa, a)
                update = F.linear(u, b)
                if self.per_example is not None and update.requires_grad:
                    self._record(name, slot, xa, u, update)
                anchor = self.anchors.get((name, slot))
                if anchor is not None:  # the same ops on equal factors: exactly zero at the anchor
                    update = update - F.linear(F.linear(xa, anchor[0]), anchor[1])
                updates[slot] = (update * self.scaling[(name, slot)]).to(out.dtype)
        if not updates:
            return out
        if len(self.slot_bounds) == 1:
            return out + updates[MAIN_SLOT]
        pieces = []
        for slot, (lo, hi) in self.slot_bounds.items():
            piece = out[..., lo:hi]
            pieces.append(piece + updates[slot] if slot in updates else piece)
        return torch.cat(pieces, dim=-1)

    def extra_repr(self) -> str:
        adapters = sorted({n for slot in self.lora_A.values() for n in slot})
        return f"in={self.in_features}, out={self.out_features}, slots={list(self.slot_bounds)}, adapters={adapters}"
