"""Noise-free Adapter Aggregation (NAA), method.md section 6, and the baseline aggregators.

For one candidate W, over the clients i that trained an adapter on it (r_i > 0), p_i = n_i / sum n_j:

    dW = sum_i p_i (alpha / r_i) B_i A_i = [p_1 s_1 B_1 | ... | p_K s_K B_K] [A_1; ...; A_K]

The stacked form is exact. The baselines average the factors instead, and
avg(B) avg(A) != avg(B A): the cross terms are the "noise".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class AdapterFactors:
    """One client's adapter on one candidate, as uploaded to the fed server."""

    client: int
    samples: int
    a: torch.Tensor  # (r, d_in)
    b: torch.Tensor  # (d_out, r)
    scale: float  # alpha / r

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class StackedDelta:
    """dW = b @ a with b (d_out, sum r_i) and a (sum r_i, d_in): what the fed server sends back
    when it is smaller than the dense d_out x d_in matrix."""

    b: torch.Tensor
    a: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.b @ self.a

    def numel(self) -> int:
        return self.a.numel() + self.b.numel()


def sample_weights(factors: Sequence[AdapterFactors]) -> list[float]:
    total = sum(f.samples for f in factors)
    return [f.samples / total for f in factors]


def aggregate(factors: Sequence[AdapterFactors]) -> StackedDelta:
    """NAA: stack p_i (alpha/r_i) B_i side by side and A_i on top of each other (exact)."""
    weights = sample_weights(factors)
    b = torch.cat([w * f.scale * f.b for w, f in zip(weights, factors, strict=True)], dim=1)
    a = torch.cat([f.a for f in factors], dim=0)
    return StackedDelta(b, a)


def dense_average(factors: Sequence[AdapterFactors]) -> torch.Tensor:
    """sum_i p_i (alpha / r_i) B_i A_i computed matrix by matrix (the reference NAA equals)."""
    weights = sample_weights(factors)
    return sum(w * f.scale * (f.b @ f.a) for w, f in zip(weights, factors, strict=True))


def fedavg_factors(factors: Sequence[AdapterFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """FedAvg of A and B separately (SplitLoRA, FedLoRA): needs one rank for all clients.
    Returns (avg A, avg of (alpha/r) B), so that the implied update is avg_sB @ avg_A."""
    ranks = {f.rank for f in factors}
    if len(ranks) != 1:
        raise ValueError(f"FedAvg of A and B needs one rank for every client, got ranks {sorted(ranks)}")
    weights = sample_weights(factors)
    a = sum(w * f.a for w, f in zip(weights, factors, strict=True))
    b = sum(w * f.scale * f.b for w, f in zip(weights, factors, strict=True))
    return a, b


def zero_padded_average(factors: Sequence[AdapterFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """HetLoRA's aggregation: pad every A to r_max rows and every (alpha/r) B to r_max columns with
    zeros, then average. Returns (avg A (r_max, d_in), avg sB (d_out, r_max)); a client of rank r
    keeps the first r rows / columns (truncation)."""
    r_max = max(f.rank for f in factors)
    weights = sample_weights(factors)
    d_out, d_in = factors[0].b.shape[0], factors[0].a.shape[1]
    a = torch.zeros(r_max, d_in, dtype=factors[0].a.dtype)
    b = torch.zeros(d_out, r_max, dtype=factors[0].b.dtype)
    for w, f in zip(weights, factors, strict=True):
        a[: f.rank] += w * f.a
        b[:, : f.rank] += w * f.scale * f.b
    return a, b
