"""Split training equals unsplit training."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import attach_lora, lora_layers, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.models.split import split_model

from .conftest import build_tiny


def random_adapters(model, name: str, rank: int, seed: int) -> None:
    """Adapters with non-zero B, so that both A and B receive gradients."""
    generator = torch.Generator().manual_seed(seed)
    for layer in lora_layers(model):
        for slot in layer.slot_bounds:
            layer.set_adapter(name, slot, rank, 16.0, generator)
            with torch.no_grad():
                layer.lora_B[slot][name].normal_(0, 0.05, generator=generator)


def adapter_grads(model, name: str) -> dict[str, torch.Tensor]:
    return {
        key: param.grad.clone()
        for key, param in model.named_parameters()
        if param.requires_grad and f".{name}" in key and param.grad is not None
    }


def unsplit_reference(family: str, tokenizer, batch, num_layers: int):
    """A tiny model with random adapters "a" on six targets, active; the unsplit model's loss on
    `batch` and the adapters' gradients (cleared from the model afterwards)."""
    model = build_tiny(family, tokenizer, num_layers=num_layers)
    attach_lora(model, ["q", "k", "v", "o", "up", "down"])
    random_adapters(model, "a", rank=4, seed=1)
    set_active_adapter(model, "a")
    reference = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    reference.loss.backward()
    expected = adapter_grads(model, "a")
    model.zero_grad(set_to_none=True)
    return model, reference.loss, expected


@pytest.mark.parametrize(
    "family", ["llama", "gpt2", "qwen2", "mistral", "qwen2-sliding", "qwen3", "olmo2", "gemma2", "gemma3", "phi3"]
)
def test_split_step_equals_unsplit_model(family, tokenizer, batch):
    model, reference_loss, expected = unsplit_reference(family, tokenizer, batch, num_layers=4)
    fused = 7 if family == "phi3" else 6  # Phi-3's gate shares gate_up_proj with up: its slot gets one too
    assert len(expected) == 4 * fused * 2  # 4 blocks x 6 candidates x (A, B)

    for split_point in (1, 2, 3):
        client, server = split_model(model, split_point)
        set_active_adapter(model, "a")
        hidden = client(batch.input_ids, batch.attention_mask)
        received = hidden.detach().requires_grad_(True)
        loss_sum, count = target_token_loss(server(received, batch.attention_mask), batch.labels)
        loss = loss_sum / count
        loss.backward()
        hidden.backward(received.grad)
        got = adapter_grads(model, "a")
        model.zero_grad(set_to_none=True)

        torch.testing.assert_close(loss, reference_loss, atol=1e-5, rtol=0)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=f"{key} at s={split_point}")


def test_cut_copies_no_frozen_weight(tokenizer):
    model = build_tiny("llama", tokenizer)
    client, server = split_model(model, 2)
    model_storage = {p.data_ptr() for p in model.parameters()}
    for part in (client, server):
        assert {p.data_ptr() for p in part.parameters()} <= model_storage
    client_names = {n for n, _ in client.named_parameters()}
    assert not any(n.startswith("blocks.2") for n in client_names)
    assert [b for b in server.block_indices] == [2, 3]


@pytest.mark.parametrize("split_point", [0, 4, -1])
def test_split_point_out_of_range_is_refused(tokenizer, split_point):
    model = build_tiny("llama", tokenizer)
    with pytest.raises(UsageError, match=r"split point .* must be in \[1, 3\]"):
        split_model(model, split_point)
