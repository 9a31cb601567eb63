"""Messages between roles: plain dataclasses of tensors and numbers that could cross a network."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hsplitlora.compression import Packed
from hsplitlora.method.aggregation import AdapterFactors, StackedDelta


@dataclass
class Activations:
    """Client -> main server, once per step: the activations at the cut. Raw tokens stay on the
    client; the attention mask and the labels travel with the activations."""

    client_id: int
    step: int
    hidden: Packed  # (B, T, d), compressed as the run's `compression` says
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss

    def nbytes(self) -> int:
        return self.hidden.nbytes() + sum(t.numel() * t.element_size() for t in (self.attention_mask, self.labels))


@dataclass
class ActivationGradient:
    """Main server -> client, once per step: dL/dh at the cut, and the step's loss for reporting."""

    client_id: int
    step: int
    grad: Packed  # (B, T, d), compressed as the run's `compression` says
    loss: float  # mean over the batch's target tokens
    num_tokens: int
    received_bytes: int = 0  # the size of the Activations message this answers (for the byte counts)

    def nbytes(self) -> int:
        return self.grad.nbytes()


@dataclass
class RoundPlan:
    """Planner -> client and main server, at the start of a round: the cut and every rank."""

    client_id: int
    round: int
    split_point: int
    ranks: dict[str, int]  # candidate name -> rank (0: frozen), client and server side


@dataclass
class AdapterUpload:
    """Client or main server -> fed server, at the end of a round: the adapters trained for one
    client, with the number of samples they were trained on."""

    client_id: int
    samples: int
    factors: dict[str, AdapterFactors]

    def nbytes(self) -> int:
        return sum(f.a.numel() * f.a.element_size() + f.b.numel() * f.b.element_size() for f in self.factors.values())


@dataclass
class ModelUpdate:
    """Fed server -> every holder of a block: dW per candidate, stacked factors or dense (whichever
    is smaller), to merge into W; adapters are then re-created fresh."""

    round: int
    deltas: dict[str, StackedDelta | torch.Tensor]

    def nbytes(self, names: set[str] | None = None) -> int:
        total = 0
        for name, delta in self.deltas.items():
            if names is None or name in names:
                total += (delta.numel() if isinstance(delta, StackedDelta) else delta.numel()) * 4
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
