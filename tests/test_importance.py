"""IWI: the gate-based measure equals sum(W * dL/dW); the smoothing and the re-planning trigger."""

from __future__ import annotations

import math

import pytest
import torch

from hsplitlora.lora.attach import attach_lora
from hsplitlora.losses import target_token_loss
from hsplitlora.method.importance import (
    ImportanceProbe,
    SmoothedImportance,
    average_importance,
    kendall_tau_distance,
    should_replan,
    warmup_sums,
)
from hsplitlora.models.split import split_model

from .conftest import build_tiny

TARGETS = {"llama": ["q", "k", "v", "o", "gate", "up", "down"], "gpt2": ["q", "k", "v", "o", "up", "down"]}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gate_importance_equals_weight_times_weight_gradient(family, tokenizer, batch):
    model = build_tiny(family, tokenizer)
    candidates = attach_lora(model, TARGETS[family])
    sums, batches = warmup_sums(model, candidates, [batch])
    assert batches == 1

    # Reference: materialise dL/dW with autograd and take sum(W * dL/dW) per candidate's slice.
    for param in model.parameters():
        param.requires_grad_(True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    total, count = target_token_loss(logits, batch.labels)
    (total / count).backward()
    for name, candidate in candidates.items():
        layer = model.get_submodule(candidate.module)
        lo, hi = layer.slot_bounds[candidate.slot]
        weight, grad = layer.base.weight, layer.base.weight.grad
        if layer.transposed:  # Conv1D: (d_in, d_out), the slot is a range of columns
            expected = (weight[:, lo:hi] * grad[:, lo:hi]).sum()
        else:
            expected = (weight[lo:hi] * grad[lo:hi]).sum()
        assert sums[name] == pytest.approx(float(expected.detach()), rel=1e-4, abs=1e-7), name


def test_client_and_server_measure_what_the_unsplit_model_measures(tokenizer, batch):
    model = build_tiny("llama", tokenizer)
    candidates = attach_lora(model, ["q", "k", "v", "o"])
    expected, _ = warmup_sums(model, candidates, [batch])
    client, server = split_model(model, 2)
    client_probe = ImportanceProbe.for_part(client, candidates)
    server_probe = ImportanceProbe.for_part(server, candidates)
    client_probe.start()
    hidden = client(batch.input_ids, batch.attention_mask)
    received = hidden.detach().requires_grad_(True)
    server_probe.start()
    total, count = target_token_loss(server(received, batch.attention_mask), batch.labels)
    (total / count).backward()
    server_probe.collect()
    hidden.backward(received.grad)
    client_probe.collect()
    got = {**client_probe.report()[0], **server_probe.report()[0]}
    assert set(client_probe.layers) == {n for n, c in candidates.items() if c.block < 2}
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-4, abs=1e-8)


def test_average_is_weighted_by_samples():
    assert average_importance([{"w": 1.0}, {"w": 4.0}], [300, 100]) == {"w": pytest.approx(1.75)}


def test_smoothing_follows_the_formula():
    smoothed = SmoothedImportance(gamma_max=0.9, tau=5.0)
    first = {"a": 2.0, "b": 1.0}
    assert smoothed.update(first) == first  # I_1 = Theta_1 (I_0 = Theta_1)
    theta = {"a": 1.0, "b": 3.0}
    phi = (abs(1.0 - 2.0) / 2.0 + abs(3.0 - 1.0) / 1.0) / 2
    gamma = min(0.9, 1 - math.exp(-(2 / 5.0) * (1 + phi)))
    got = smoothed.update(theta)
    assert smoothed.gamma == pytest.approx(gamma)
    assert got == {"a": pytest.approx(gamma * 2 + (1 - gamma) * 1), "b": pytest.approx(gamma * 1 + (1 - gamma) * 3)}
    for _ in range(50):  # late rounds lean on history, capped at gamma_max
        smoothed.update(theta)
    assert smoothed.gamma == pytest.approx(0.9)


def test_replanning_fires_only_when_the_ranking_moves_beyond_delta():
    names = [f"w{i}" for i in range(10)]
    base = {n: float(i) for i, n in enumerate(names)}
    scaled = {n: 3.0 * v + 1.0 for n, v in base.items()}  # same ranking, other values
    assert kendall_tau_distance(base, scaled) == 0.0
    assert not should_replan(scaled, base, delta=0.1)
    one_swap = dict(base, w0=1.5)  # one adjacent pair out of 45 swaps: distance 1/45
    assert kendall_tau_distance(one_swap, base) == pytest.approx(1 / 45)
    assert not should_replan(one_swap, base, delta=0.1)
    reversed_ = {n: -v for n, v in base.items()}
    assert kendall_tau_distance(reversed_, base) == 1.0
    assert should_replan(reversed_, base, delta=0.1)
    shuffled = dict(zip(names, [3.0, 0.0, 9.0, 1.0, 7.0, 2.0, 8.0, 4.0, 6.0, 5.0], strict=True))
    distance = kendall_tau_distance(shuffled, base)
    assert 0.1 < distance < 1.0 and should_replan(shuffled, base, delta=0.1)
    assert not should_replan(shuffled, base, delta=distance)


def test_probe_adds_no_trainable_parameter(tokenizer):
    model = build_tiny("llama", tokenizer)
    candidates = attach_lora(model, ["q"])
    before = sum(1 for _ in model.parameters())
    probe = ImportanceProbe.for_model(model, candidates)
    probe.start()
    assert sum(1 for _ in model.parameters()) == before
    assert all(not p.requires_grad for p in model.parameters())
    torch.testing.assert_close(probe.layers[next(iter(candidates))].importance_gate, torch.ones(1))
