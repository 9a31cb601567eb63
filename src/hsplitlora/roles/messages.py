"""Messages between roles: plain dataclasses of tensors and numbers that could cross a network."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hsplitlora.compression import Packed, pack, pack_with_scale
from hsplitlora.config import DEFAULT_COMPRESSION
from hsplitlora.method.aggregation import AdapterFactors, StackedDelta


@dataclass
class Activations:
    """Client -> main server, once per step: the activations at the cut. Raw tokens stay on the
    client; the attention mask travels with the activations, and so do the labels, except in a
    U-shaped split, where the client computes the loss itself and sends none."""

    client_id: int
    step: int
    hidden: Packed | torch.Tensor  # (B, T, d): the sender's tensor, Packed once its cut sends it
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor | None  # (B, T), -100 where no loss; None in a U-shaped split

    def nbytes(self) -> int:
        extra = [t for t in (self.attention_mask, self.labels) if t is not None]
        return self.hidden.nbytes() + sum(t.numel() * t.element_size() for t in extra)


@dataclass
class ActivationGradient:
    """Main server -> client, once per step: dL/dh at the cut, and the step's loss for reporting
    (None in a U-shaped split: the main server never sees the loss)."""

    client_id: int
    step: int
    grad: Packed | torch.Tensor  # (B, T, d): the sender's tensor, Packed once its cut sends it
    loss: float | None  # mean over the batch's target tokens
    num_tokens: int

    def nbytes(self) -> int:
        return self.grad.nbytes()


@dataclass
class MiddleActivations:
    """Main server -> client, once per step of a U-shaped split: the activations after the last
    block of the middle, for the client's tail (its last blocks, head and loss)."""

    client_id: int
    step: int
    hidden: Packed | torch.Tensor  # (B, T, d), Packed on the wire

    def nbytes(self) -> int:
        return self.hidden.nbytes()


@dataclass
class TailGradient:
    """Client -> main server, once per step of a U-shaped split: dL/dh at the end of the middle."""

    client_id: int
    step: int
    grad: Packed | torch.Tensor  # (B, T, d), Packed on the wire

    def nbytes(self) -> int:
        return self.grad.nbytes()


@dataclass
class StepRecord:
    """What a client knows after a split step: its loss and the bytes of every message it sent
    and received across the cut, by ledger category (engines add them to their traffic)."""

    loss: float | None
    traffic: dict[str, int]


@dataclass
class RoundPlan:
    """Planner -> client and main server, at the start of a round: the cut and every rank."""

    client_id: int
    round: int
    split_point: int
    ranks: dict[str, int]  # candidate name -> rank (0: frozen), client and server side
    tail_blocks: int | None = None  # U-shaped split: the client also runs the last t blocks and the head
    # What adapters do across rounds (LIFECYCLES): re-created fresh; kept, measured from an anchor
    # that moves when W absorbs the update; kept and overwritten by the aggregated factors.
    adapters: str = "recreate"
    full_finetune_lr: float | None = None  # every weight trained at this rate instead of adapters (centralised FT)
    recompute: bool = False  # the client recomputes its front blocks' activations in backward (memory for time)


LIFECYCLES = ("recreate", "anchor", "overwrite")


@dataclass
class AdapterUpload:
    """Client or main server -> fed server, at the end of a round: the adapters trained for one
    client, with the number of samples they were trained on."""

    client_id: int
    samples: int
    factors: dict[str, AdapterFactors]

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.factors.values())


@dataclass
class OwnTerm:
    """A term of a stacked change that its receiver holds (client `client`'s adapter and anchor):
    it is not sent; the receiver computes its rows with weight `weight` (p_i), with the anchor's
    rows if `anchored`."""

    client: int
    weight: float
    anchored: bool


@dataclass
class PartialStack:
    """A stacked change dW = b @ a without the receiver's own terms (method.md section 6, down-link
    forms): `pieces` in the canonical order, each the compressed payload of another adapter's
    columns of b and rows of a (with a's row scales under int8), or an `OwnTerm`. `scale_b` and
    `scale_a` are the whole stack's scales where `compression` shares one over terms (fp16: one per
    tensor; int8: b's per output row), so that `rebuild` gives the whole stack bit for bit."""

    mode: str
    pieces: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | OwnTerm]
    scale_b: torch.Tensor | None = None
    scale_a: torch.Tensor | None = None

    def nbytes(self) -> int:
        total = sum(t.numel() * t.element_size() for t in (self.scale_b, self.scale_a) if t is not None)
        for piece in self.pieces:
            tensors = [t for t in piece if t is not None] if isinstance(piece, tuple) else []
            total += sum(t.numel() * t.element_size() for t in tensors) if tensors else 8  # an OwnTerm's float64 weight
        return total

    def rebuild(self, own_rows: Callable[[OwnTerm], tuple[torch.Tensor, torch.Tensor]]) -> StackedDelta:
        """The whole stack as every receiver merges it, with the own terms' rows from `own_rows`
        (`term_rows` of the held adapter), compressed as the sender compressed the whole."""
        b_parts, a_parts, a_scales = [], [], []
        for piece in self.pieces:
            if isinstance(piece, OwnTerm):
                b_rows, a_rows = own_rows(piece)
                b_data = pack_with_scale(b_rows, self.mode, self.scale_b).data
                packed_a = pack(a_rows, "int8") if self.mode == "int8" else pack_with_scale(a_rows, self.mode,
                                                                                              self.scale_a)  # fmt: skip
                piece = (b_data, packed_a.data, packed_a.scale if self.mode == "int8" else None)
            b_parts.append(piece[0])
            a_parts.append(piece[1])
            a_scales.append(piece[2])
        scale_a = torch.cat(a_scales) if self.mode == "int8" else self.scale_a
        b = Packed(self.mode, torch.cat(b_parts, dim=1), self.scale_b).unpack()
        return StackedDelta(b, Packed(self.mode, torch.cat(a_parts, dim=0), scale_a).unpack())


@dataclass
class ModelUpdate:
    """Fed server -> every holder of a block: dW per candidate, stacked factors or dense (whichever
    is smaller), to merge into W; then adapters move their anchors (persistent) or are re-created
    fresh. `sizes` are the bytes each delta takes on the wire (in the run's compression)."""

    round: int
    deltas: dict[str, StackedDelta | PartialStack | torch.Tensor]
    sizes: dict[str, int] | None = None

    @classmethod
    def packed(
        cls, round_: int, deltas: dict[str, StackedDelta | torch.Tensor], mode: str = DEFAULT_COMPRESSION
    ) -> ModelUpdate:
        """The update as its receivers see it after compression `mode` (every holder merges the
        same values), with its bytes on the wire."""
        sent, sizes = {}, {}
        for name, delta in deltas.items():
            tensors = [delta.b, delta.a] if isinstance(delta, StackedDelta) else [delta]
            packed = [pack(t, mode) for t in tensors]
            sizes[name] = sum(p.nbytes() for p in packed)
            values = [p.unpack() for p in packed]
            sent[name] = StackedDelta(*values) if isinstance(delta, StackedDelta) else values[0]
        return cls(round_, sent, sizes)

    def nbytes(self, names: set[str] | None = None) -> int:
        total = 0
        for name, delta in self.deltas.items():
            if names is None or name in names:
                total += self.sizes[name] if self.sizes is not None else delta.numel() * 4
        return total


@dataclass
class AdapterBroadcast:
    """Fed server -> clients and main server, for strategies whose adapters persist: the
    aggregated factors per candidate, (A, alpha/r * B) at the largest rank (a client of lower
    rank keeps the first r rows of A and columns of B)."""

    round: int
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def nbytes(self, names: set[str] | None = None) -> int:
        return sum((a.numel() + b.numel()) * 4 for n, (a, b) in self.factors.items() if names is None or n in names)
