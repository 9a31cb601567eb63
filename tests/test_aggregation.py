"""NAA: stacked aggregation equals the dense weighted sum; the baselines' noise is measurable."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.method.aggregation import (
    AdapterFactors,
    aggregate,
    dense_average,
    fedavg_factors,
    zero_padded_average,
)

LEVELS = (2, 4, 8, 16)


def random_factors(ranks, samples, seed, d_in=48, d_out=32, alpha=16.0):
    generator = torch.Generator().manual_seed(seed)
    return [
        AdapterFactors(i, n, torch.randn(r, d_in, generator=generator, dtype=torch.float64),
                       torch.randn(d_out, r, generator=generator, dtype=torch.float64), alpha / r)
        for i, (r, n) in enumerate(zip(ranks, samples, strict=True))
    ]  # fmt: skip


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.lists(st.sampled_from(LEVELS), min_size=1, max_size=6),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_stacked_aggregation_equals_the_dense_weighted_sum(ranks, seed, data):
    samples = data.draw(st.lists(st.integers(1, 1000), min_size=len(ranks), max_size=len(ranks)))
    factors = random_factors(ranks, samples, seed)
    stacked = aggregate(factors)
    expected = dense_average(factors)
    assert stacked.a.shape == (sum(ranks), 48) and stacked.b.shape == (32, sum(ranks))
    error = torch.linalg.norm(stacked.dense() - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6


def test_averaging_the_factors_adds_measurable_noise():
    factors = random_factors([8, 8, 8], [100, 300, 600], seed=1)
    exact = dense_average(factors)
    a, b = fedavg_factors(factors)
    noise = torch.linalg.norm(b @ a - exact) / torch.linalg.norm(exact)
    assert noise > 0.1  # avg(B) avg(A) != avg(B A)

    mixed = random_factors([2, 8, 16], [100, 300, 600], seed=2)
    a, b = zero_padded_average(mixed)
    assert a.shape == (16, 48) and b.shape == (32, 16)
    noise = torch.linalg.norm(b @ a - dense_average(mixed)) / torch.linalg.norm(dense_average(mixed))
    assert noise > 0.1
    assert (
        torch.linalg.norm(aggregate(mixed).dense() - dense_average(mixed)) / torch.linalg.norm(dense_average(mixed))
        < 1e-12
    )


def test_one_client_averages_to_itself():
    (factor,) = random_factors([4], [10], seed=3)
    torch.testing.assert_close(aggregate([factor]).dense(), factor.scale * factor.b @ factor.a)
    a, b = fedavg_factors([factor])
    torch.testing.assert_close(b @ a, factor.scale * factor.b @ factor.a)
