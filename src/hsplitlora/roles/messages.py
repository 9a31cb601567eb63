"""Messages between roles: plain dataclasses of tensors and numbers that could cross a network."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplitlora.compression import Packed, pack
from hsplitlora.method.aggregation import AdapterFactors, StackedDelta


@dataclass
class Activations:
    """Client -> main server, once per step: the activations at the cut. Raw tokens stay on the
    client; the attention mask travels with the activations, and so do the labels, except in a
    U-shaped split, where the client computes the loss itself and sends none."""

    client_id: int
    step: int
    hidden: Packed  # (B, T, d), compressed as the run's `compression` says
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
    grad: Packed  # (B, T, d), compressed as the run's `compression` says
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
    hidden: Packed  # (B, T, d)

    def nbytes(self) -> int:
        return self.hidden.nbytes()


@dataclass
class TailGradient:
    """Client -> main server, once per step of a U-shaped split: dL/dh at the end of the middle."""

    client_id: int
    step: int
    grad: Packed  # (B, T, d)

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
class ModelUpdate:
    """Fed server -> every holder of a block: dW per candidate, stacked factors or dense (whichever
    is smaller), to merge into W; then adapters move their anchors (persistent) or are re-created
    fresh. `sizes` are the bytes each delta takes on the wire (in the run's compression)."""

    round: int
    deltas: dict[str, StackedDelta | torch.Tensor]
    sizes: dict[str, int] | None = None

    @classmethod
    def packed(cls, round_: int, deltas: dict[str, StackedDelta | torch.Tensor], mode: str = "fp32") -> ModelUpdate:
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
