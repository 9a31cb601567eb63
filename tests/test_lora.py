"""The multi-tenant LoRA layer: tenancy, merging, re-creation, GPT-2's fused c_attn."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hsplitlora.lora.attach import attach_lora, set_active_adapter
from hsplitlora.lora.layer import MAIN_SLOT, MultiLoRALayer

from .conftest import build_tiny


def trained_like(layer: MultiLoRALayer, name: str, slot: str, rank: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    layer.set_adapter(name, slot, rank, 16.0, generator)
    with torch.no_grad():
        layer.lora_B[slot][name].normal_(0, 0.1, generator=generator)


def make_layer(kind: str) -> MultiLoRALayer:
    torch.manual_seed(0)
    if kind == "linear":
        return MultiLoRALayer(nn.Linear(24, 16))
    conv = Conv1D(3 * 8, 8)  # GPT-2's c_attn: [q | k | v]
    nn.init.normal_(conv.weight)
    return MultiLoRALayer(conv, {"q": 8, "k": 8, "v": 8})


@pytest.mark.parametrize("kind", ["linear", "fused"])
def test_merge_equals_active_adapter(kind):
    layer = make_layer(kind)
    x = torch.randn(3, 5, layer.in_features)
    for i, slot in enumerate(layer.slot_bounds):
        trained_like(layer, "a", slot, rank=2 + 2 * i, seed=i)
    layer.active_adapter = "a"
    with torch.no_grad():
        expected = layer(x)
        for slot in layer.slot_bounds:
            a, b, scale = layer.factors("a", slot)
            layer.merge(slot, scale * b @ a)
        layer.remove_adapter("a")
        merged = layer(x)
    assert layer.rank("a", next(iter(layer.slot_bounds))) == 0
    torch.testing.assert_close(merged, expected, atol=1e-5, rtol=0)


def test_fused_slots_get_their_own_ranks_and_only_touch_their_slice():
    layer = make_layer("fused")
    x = torch.randn(2, 4, 8)
    base = layer(x).detach()
    trained_like(layer, "a", "k", rank=4, seed=3)
    layer.active_adapter = "a"
    out = layer(x).detach()
    assert layer.rank("a", "k") == 4 and layer.rank("a", "q") == 0
    torch.testing.assert_close(out[..., :8], base[..., :8])
    torch.testing.assert_close(out[..., 16:], base[..., 16:])
    assert not torch.allclose(out[..., 8:16], base[..., 8:16])
    # The slot's weight view is the matrix that produces that slice: W_k x.
    torch.testing.assert_close(base[..., 8:16], x @ layer.weight("k").T + layer.base.bias[8:16])


def test_tenants_do_not_see_each_other(tokenizer, batch):
    model = build_tiny("llama", tokenizer)
    attach_lora(model, ["q", "v"])
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALayer)]
    for i, layer in enumerate(layers):
        trained_like(layer, "alice", MAIN_SLOT, 4, seed=i)
        trained_like(layer, "bob", MAIN_SLOT, 8, seed=100 + i)

    def logits(name: str) -> torch.Tensor:
        set_active_adapter(model, name)
        with torch.no_grad():
            return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    bob_before = logits("bob")
    alice_before = logits("alice")
    # Train alice for a step: bob's output must not move.
    set_active_adapter(model, "alice")
    params = [p for layer in layers for p in layer.adapter_parameters("alice")]
    optimizer = torch.optim.SGD(params, lr=1.0)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
    optimizer.step()
    assert all(p.grad is None for layer in layers for p in layer.adapter_parameters("bob"))
    assert not torch.allclose(logits("alice"), alice_before)
    torch.testing.assert_close(logits("bob"), bob_before, atol=0, rtol=0)


def test_recreated_adapter_is_fresh_with_new_rank():
    layer = make_layer("linear")
    trained_like(layer, "a", MAIN_SLOT, 4, seed=0)
    layer.set_adapter("a", MAIN_SLOT, 16, 16.0, torch.Generator().manual_seed(1))
    a, b, scale = layer.factors("a", MAIN_SLOT)
    assert a.shape == (16, 24) and b.shape == (16, 16) and scale == 1.0
    assert torch.count_nonzero(b) == 0 and torch.count_nonzero(a) > 0
    x = torch.randn(2, 24)
    layer.active_adapter = "a"
    torch.testing.assert_close(layer(x), layer.base(x))  # B = 0: a fresh adapter changes nothing


def test_rank_zero_means_no_adapter():
    layer = make_layer("linear")
    layer.set_adapter("a", MAIN_SLOT, 0, 16.0)
    assert layer.rank("a", MAIN_SLOT) == 0 and layer.adapter_parameters("a") == []
    with pytest.raises(ValueError, match="rank"):
        layer.set_adapter("a", MAIN_SLOT, -2, 16.0)


def test_gpt2_candidates_split_c_attn_into_q_k_v(tokenizer):
    model = build_tiny("gpt2", tokenizer, num_layers=2)
    candidates = attach_lora(model, ["q", "k", "v", "o"])
    names = list(candidates)
    assert names[:4] == [
        "transformer.h.0.attn.c_attn.q",
        "transformer.h.0.attn.c_attn.k",
        "transformer.h.0.attn.c_attn.v",
        "transformer.h.0.attn.c_proj",
    ]
    assert all(c.d_in == 64 and c.d_out == 64 for c in candidates.values())
    # Attaching again wraps nothing twice.
    assert list(attach_lora(model, ["q", "k", "v", "o"])) == names
    assert not isinstance(model.transformer.h[0].attn.c_attn.base, MultiLoRALayer)


def test_llama_candidates_follow_module_names(tokenizer):
    model = build_tiny("llama", tokenizer, num_layers=2)
    candidates = attach_lora(model, ["q", "k", "v", "o", "gate", "up", "down"])
    assert "model.layers.1.self_attn.k_proj" in candidates
    assert candidates["model.layers.1.self_attn.k_proj"].d_out == 32  # 2 kv heads x 16
    assert candidates["model.layers.0.mlp.down_proj"].d_in == 128


@pytest.mark.parametrize("kind", ["linear", "fused"])
@pytest.mark.parametrize("anchored", [False, True])
def test_resizing_an_adapter_leaves_every_output_unchanged(kind, anchored):
    layer = make_layer(kind)
    x = torch.randn(3, 5, layer.in_features)
    slot = next(iter(layer.slot_bounds))
    trained_like(layer, "a", slot, rank=4, seed=1)
    if anchored:
        with torch.no_grad():  # trained since its anchor was set
            layer.set_anchor("a", slot)
            layer.lora_A[slot]["a"].add_(0.1)
            layer.set_anchor("a", slot)  # the round boundary: the anchor moves to the factors
    layer.active_adapter = "a"
    with torch.no_grad():
        before = layer(x)
        dense = layer.delta("a", slot) if not anchored else None
        for rank in (8, 16, 2, 1):  # grow, grow, shrink, shrink
            layer.resize_adapter("a", slot, rank, 16.0, torch.Generator().manual_seed(rank))
            assert layer.rank("a", slot) == rank
            if not anchored and rank >= 4:  # growing keeps (alpha/r) B A exactly
                torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
                torch.testing.assert_close(layer.delta("a", slot), dense, atol=1e-6, rtol=0)
            if anchored:  # an adapter at its anchor adds nothing, whatever its size
                torch.testing.assert_close(layer(x), before, atol=1e-5, rtol=0)
                assert layer.anchor("a", slot)[0].shape[0] == rank


def test_shrinking_keeps_the_best_rank_r_part_of_the_update():
    layer = make_layer("linear")
    trained_like(layer, "a", MAIN_SLOT, rank=8, seed=2)
    with torch.no_grad():
        layer.lora_A[MAIN_SLOT]["a"].normal_()
    full = layer.delta("a", MAIN_SLOT).clone()
    layer.resize_adapter("a", MAIN_SLOT, 2, 16.0)
    u, s, vh = torch.linalg.svd(full)
    torch.testing.assert_close(layer.delta("a", MAIN_SLOT), (u[:, :2] * s[:2]) @ vh[:2], atol=1e-5, rtol=1e-5)


def test_an_anchored_adapter_adds_exactly_nothing_until_it_trains():
    layer = make_layer("linear")
    x = torch.randn(3, 5, layer.in_features)
    trained_like(layer, "a", MAIN_SLOT, rank=4, seed=3)
    layer.set_anchor("a", MAIN_SLOT)
    layer.active_adapter = "a"
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base(x))  # bit for bit: the same ops on equal factors
        layer.lora_B[MAIN_SLOT]["a"].add_(0.5)
        assert not torch.equal(layer(x), layer.base(x))


def test_rank_stabilised_scaling_is_alpha_over_root_rank_and_resizing_keeps_the_update():
    """lora_scaling rslora: the layer adds alpha / sqrt(r) B A x; growing and shrinking keep it."""
    layer = make_layer("linear")
    generator = torch.Generator().manual_seed(3)
    layer.set_adapter("a", MAIN_SLOT, 4, 16.0, generator, scaling="rslora")
    with torch.no_grad():
        layer.lora_B[MAIN_SLOT]["a"].normal_(0, 0.1, generator=generator)
    a, b, scale = layer.factors("a", MAIN_SLOT)
    assert scale == 16.0 / 2.0
    x = torch.randn(2, 3, layer.in_features)
    layer.active_adapter = "a"
    with torch.no_grad():
        expected = layer.base(x) + 8.0 * x @ (b @ a).T
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
        dense = layer.delta("a", MAIN_SLOT).clone()
        layer.resize_adapter("a", MAIN_SLOT, 16, 16.0, generator, scaling="rslora")  # grow: scale 4
        assert layer.factors("a", MAIN_SLOT)[2] == 4.0
        torch.testing.assert_close(layer.delta("a", MAIN_SLOT), dense, atol=1e-6, rtol=0)
        layer.resize_adapter("a", MAIN_SLOT, 4, 16.0, generator, scaling="rslora")  # shrink back: rank 4 holds it
        torch.testing.assert_close(layer.delta("a", MAIN_SLOT), dense, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="choose standard or rslora"):
        layer.set_adapter("b", MAIN_SLOT, 2, 16.0, scaling="sqrt")
