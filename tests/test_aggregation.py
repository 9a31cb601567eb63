"""NAA: stacked aggregation equals the dense weighted sum; the baselines' noise is measurable."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.method.aggregation import (
    AdapterFactors,
    ExactChange,
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


def anchored_factors(ranks, samples, seed):
    """Adapters after a round of training, each with the anchor it started the round from."""
    factors = random_factors(ranks, samples, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    anchors = [(torch.randn_like(f.a), torch.randn(f.b.shape, generator=generator, dtype=f.b.dtype))
               for f in factors]  # fmt: skip
    return factors, anchors


@settings(max_examples=60, deadline=None)
@given(
    ranks=st.lists(st.sampled_from(LEVELS), min_size=1, max_size=6),
    seed=st.integers(0, 10_000),
    data=st.data(),
)
def test_the_stacked_change_equals_the_dense_weighted_sum_of_every_adapters_change(ranks, seed, data):
    samples = data.draw(st.lists(st.integers(1, 1000), min_size=len(ranks), max_size=len(ranks)))
    factors, anchors = anchored_factors(ranks, samples, seed)
    stacked = aggregate(factors, anchors)
    weights = [n / sum(samples) for n in samples]
    expected = sum(
        w * f.scale * (f.b @ f.a - b0 @ a0) for w, f, (a0, b0) in zip(weights, factors, anchors, strict=True)
    )
    assert stacked.a.shape == (2 * sum(ranks), 48)
    error = torch.linalg.norm(stacked.dense() - expected) / torch.linalg.norm(expected)
    assert error <= 1e-6


def test_the_fed_server_measures_each_change_from_the_upload_it_holds():
    from hsplitlora.roles.fed_server import FedServer
    from hsplitlora.roles.messages import AdapterUpload

    fed = FedServer(ExactChange())
    first = random_factors([4, 8], [10, 30], seed=5)
    fed.aggregate(1, [AdapterUpload(f.client, f.samples, {"w": f}) for f in first])  # anchors zero: new adapters
    second = random_factors([4, 8], [10, 30], seed=6)
    for f in second:
        f.anchor = "held"
    update = fed.aggregate(2, [AdapterUpload(f.client, f.samples, {"w": f}) for f in second])
    expected = dense_average(second, [(f.a, f.b) for f in first])
    delta = update.deltas["w"]
    sent = delta if isinstance(delta, torch.Tensor) else delta.dense()
    torch.testing.assert_close(sent.double(), expected, atol=1e-5, rtol=1e-5)
    restored = FedServer(ExactChange())
    restored.load_state_dict(fed.state_dict())
    assert restored.previous.keys() == fed.previous.keys()


@settings(max_examples=30, deadline=None)
@given(
    ranks=st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4), seed=st.integers(0, 1000), keep=st.integers(1, 16)
)
def test_low_rank_factors_are_the_truncated_svd(ranks, seed, keep):
    from hsplitlora.method.aggregation import low_rank_factors

    stacked = aggregate(random_factors(ranks, [1] * len(ranks), seed))
    left, right = low_rank_factors(stacked.b, stacked.a, keep)
    u, s, vh = torch.linalg.svd(stacked.dense())
    best = (u[:, :keep] * s[:keep]) @ vh[:keep]
    torch.testing.assert_close(left @ right, best, atol=1e-8, rtol=1e-8)
    assert left.shape == (32, keep) and right.shape == (keep, 48)


def test_flexlora_sends_the_best_rank_r_approximation_of_the_dense_sum():
    from hsplitlora.method.aggregation import svd_average

    factors = random_factors([2, 4, 8], [100, 300, 600], seed=7)
    a, scaled_b = svd_average(factors)
    exact = dense_average(factors)
    u, s, vh = torch.linalg.svd(exact)
    for rank in (2, 4, 8):
        torch.testing.assert_close(scaled_b[:, :rank] @ a[:rank], (u[:, :rank] * s[:rank]) @ vh[:rank])
