"""Noise-free Adapter Aggregation (NAA), method.md section 6, and the baseline aggregators.

For one candidate W, over the clients i that trained an adapter on it (r_i > 0), p_i = n_i / sum n_j,
with each adapter's anchor (B0_i, A0_i) (its factors when the round started; zero for a new one):

    dW = sum_i p_i s_i (B_i A_i - B0_i A0_i) = [.. p_i s_i B_i | -p_i s_i B0_i ..] [..; A_i; A0_i; ..]

The stacked form is exact. The baselines average the factors instead, and
avg(B) avg(A) != avg(B A): the cross terms are the "noise". FlexLoRA sums the dense products and
splits the sum back to each client's rank by truncated SVD (`low_rank_factors`).
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
    scale: float  # the layer's scale: alpha / r, or alpha / sqrt(r) with lora_scaling rslora
    # The anchor (A0, B0) the change is measured from: "held" (the fed server kept this client's
    # previous upload, which is the anchor), "zero" (a new adapter: B0 = 0) or "sent" (re-anchored
    # by a resize or a lost round: A0, B0 travel with the upload).
    anchor: str = "zero"
    anchor_a: torch.Tensor | None = None
    anchor_b: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def nbytes(self) -> int:
        tensors = [t for t in (self.a, self.b, self.anchor_a, self.anchor_b) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)


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

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a, self.b


def sample_weights(factors: Sequence[AdapterFactors]) -> list[float]:
    total = sum(f.samples for f in factors)
    return [f.samples / total for f in factors]


def term_rows(
    weight: float, scale: float, a: torch.Tensor, b: torch.Tensor, anchor: tuple[torch.Tensor, torch.Tensor] | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One adapter's term p s (B A - B0 A0) as stacked rows: ([p s B | -p s B0], [A; A0]). The fed
    server and a receiver that holds the adapter compute it with this one function, bit for bit."""
    if anchor is None:
        return weight * scale * b, a
    return torch.cat([weight * scale * b, -weight * scale * anchor[1]], dim=1), torch.cat([a, anchor[0]], dim=0)


def stacked_terms(
    factors: Sequence[AdapterFactors], anchors: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every adapter's term rows (`term_rows`), in the canonical order of `factors`."""
    weights = sample_weights(factors)
    anchors = anchors or [None] * len(factors)
    return [term_rows(w, f.scale, f.a, f.b, anchor) for w, f, anchor in zip(weights, factors, anchors, strict=True)]


def aggregate(
    factors: Sequence[AdapterFactors], anchors: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None
) -> StackedDelta:
    """NAA: stack p_i s_i B_i (and -p_i s_i B0_i) side by side and A_i (and A0_i) on top of each
    other (exact). `anchors[i]` is (A0_i, B0_i), or None for an anchor of zero."""
    terms = stacked_terms(factors, anchors)
    return StackedDelta(torch.cat([b for b, _ in terms], dim=1), torch.cat([a for _, a in terms], dim=0))


def best_low_rank(matrix: torch.Tensor, rank: int, energy: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with left @ right the best approximation of `matrix` (Eckart-Young) of rank
    k = `rank`, or, with `energy`, the smallest k <= `rank` keeping that share of sum s^2."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = min(rank, s.shape[0])
    if energy is not None and keep > 0:
        share = torch.cumsum(s.double() ** 2, 0) / (s.double() ** 2).sum().clamp_min(1e-300)
        keep = min(keep, int((share < energy).sum()) + 1)
    return u[:, :keep] * s[:keep], vh[:keep]


def dense_average(
    factors: Sequence[AdapterFactors], anchors: Sequence[tuple[torch.Tensor, torch.Tensor] | None] | None = None
) -> torch.Tensor:
    """sum_i p_i s_i (B_i A_i - B0_i A0_i) computed matrix by matrix (the reference NAA equals)."""
    weights = sample_weights(factors)
    anchors = anchors or [None] * len(factors)
    return sum(
        w * f.scale * (f.b @ f.a - (anchor[1] @ anchor[0] if anchor is not None else 0))
        for w, f, anchor in zip(weights, factors, anchors, strict=True)
    )


def low_rank_factors(b: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best rank-`rank` factorisation (left, right) of b @ a (Eckart-Young), from the thin
    factors alone: QR of each side, an SVD of the small core. Singular values are split evenly
    (left = U sqrt(S), right = sqrt(S) V^T), in decreasing order, so keeping the first r columns of
    left and rows of right is itself the best rank-r factorisation."""
    q_left, r_left = torch.linalg.qr(b)
    q_right, r_right = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(r_left @ r_right.T)
    keep = min(rank, s.shape[0])
    root = s[:keep].sqrt()
    left = (q_left @ u[:, :keep]) * root
    right = root[:, None] * (vh[:keep] @ q_right.T)
    if keep < rank:  # the product has lower rank than asked: pad with zero directions
        left = torch.cat([left, left.new_zeros(left.shape[0], rank - keep)], dim=1)
        right = torch.cat([right, right.new_zeros(rank - keep, right.shape[1])])
    return left, right


def svd_average(factors: Sequence[AdapterFactors]) -> tuple[torch.Tensor, torch.Tensor]:
    """FlexLoRA: the dense weighted sum sum_i p_i s_i B_i A_i, factorised by truncated SVD at the
    largest rank. Returns (A, sB) as `zero_padded_average` does; a client of rank r keeps the first
    r rows / columns, which is the best rank-r approximation of the sum."""
    stacked = aggregate(factors)
    scaled_b, a = low_rank_factors(stacked.b, stacked.a, max(f.rank for f in factors))
    return a, scaled_b


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


class Aggregation:
    """How the fed server combines one candidate's adapters, and what travels back down; a
    strategy owns one. `merges`: the result is a change dW that every holder of W merges (a
    `StackedDelta`), else averaged factors (A, sB) that the holders keep training. `reads_anchors`:
    the change is measured from each adapter's anchor, when it has one (NAA). `one_rank`:
    every client must train one rank (FedAvg of A and B)."""

    merges = True
    reads_anchors = False
    one_rank = False

    def combine(
        self, factors: Sequence[AdapterFactors], anchors: Sequence[tuple[torch.Tensor, torch.Tensor] | None]
    ) -> StackedDelta | tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def values_down(self, d_in: int, d_out: int, trained: Sequence[int], anchored: bool, own: int = 0) -> int:
        """Values sent down for one candidate trained at ranks `trained` (for the time model) to a
        receiver whose own adapter on it has rank `own` (0: none); `anchored`: the adapters keep an
        anchor (persistent), so each one's change has 2 r_i rows."""
        raise NotImplementedError


class ExactChange(Aggregation):
    """NAA: the stacked change of every adapter (exact), merged into every copy of W; it goes down
    as the stacked factors (2 r_i rows per anchored adapter, r_i otherwise) or the dense matrix,
    whichever is smaller. Stacked, a receiver is sent the other adapters' rows only and rebuilds
    its own term (its weight p_i travels: 2 values)."""

    reads_anchors = True
    error_feedback = False

    def combine(self, factors, anchors):
        return aggregate(factors, anchors)

    def values_down(self, d_in, d_out, trained, anchored, own=0):
        rows = 2 if anchored else 1
        if sum(trained) * rows * (d_in + d_out) >= d_in * d_out:
            return d_in * d_out
        return (sum(trained) - own) * rows * (d_in + d_out) + (2 if own else 0)


class TruncatedChange(ExactChange):
    """NAA's exact change sent as its best rank-k approximation with error feedback (method.md
    section 6, `update_form: svd-ef`): the fed server keeps R per candidate, sends
    U = best rank-k of (dW + R) and keeps R <- dW + R - U; every copy merges U. k = `rank`, or the
    smallest k <= `rank` that keeps the share `energy` of (dW + R)'s squared singular values."""

    error_feedback = True

    def __init__(self, rank: int, energy: float | None = None):
        self.rank = rank
        self.energy = energy

    def truncate(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return best_low_rank(matrix, self.rank, self.energy)

    def values_down(self, d_in, d_out, trained, anchored, own=0):
        return min(self.rank * (d_in + d_out), d_in * d_out)


class MergedZeroPad(Aggregation):
    """The no-naa ablation with re-created adapters: the zero-padded average of the factors,
    merged into W with its cross terms (the "noise" NAA removes)."""

    def combine(self, factors, anchors):
        a, b = zero_padded_average(factors)
        return StackedDelta(b, a)

    def values_down(self, d_in, d_out, trained, anchored, own=0):
        return min(max(trained) * (d_in + d_out), d_in * d_out)


class FactorAverage(Aggregation):
    """Averaged factors at the largest rank trained, sent back for the holders to keep (each keeps
    its first r rows / columns): FedAvg, HetLoRA's zero-padded average, FlexLoRA's SVD."""

    merges = False

    def __init__(self, average, one_rank: bool = False):
        self.average = average
        self.one_rank = one_rank

    def combine(self, factors, anchors):
        return self.average(factors)

    def values_down(self, d_in, d_out, trained, anchored, own=0):
        return max(trained) * (d_in + d_out)


FEDAVG = FactorAverage(fedavg_factors, one_rank=True)
ZERO_PAD_TRUNCATE = FactorAverage(zero_padded_average)
SVD = FactorAverage(svd_average)
