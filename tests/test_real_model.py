"""Integration with the real default model, SmolLM2-135M-Instruct (slow: about a minute)."""

from __future__ import annotations

import time

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.lora.attach import set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.models import loading
from hsplitlora.setup import fixed_federation

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """Convert from the package into a fresh cache, then load again from that cache."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HSPLITLORA_CACHE_DIR", str(cache))
        assert not loading.smollm2_cache_path().exists()
        first = loading.load_model("smollm2-135m")
        assert (loading.smollm2_cache_path() / "model.safetensors").is_file()
        started = time.perf_counter()
        second = loading.load_model("smollm2-135m")
        cached_seconds = time.perf_counter() - started
    return first, second, cached_seconds


def test_smollm2_loads_from_package_then_from_cache(smollm2, tokenizer):
    first, second, cached_seconds = smollm2
    assert first.model.config.model_type == "llama" and first.model.config.num_hidden_layers == 30
    assert cached_seconds < 10
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert second.tokenizer.eos_token == "<|im_end|>"
    assert all(not p.requires_grad for p in second.model.parameters())


def test_five_split_steps_lower_the_loss(smollm2):
    _, loaded, _ = smollm2
    config = RunConfig(model="smollm2-135m", clients=1, split_point=8, rank=8, local_steps=5, batch_size=8, lr=2e-3)
    federation = fixed_federation(config, loaded=loaded)
    client = federation.clients[0]
    probe = next(client.batches)  # a fixed E2E batch of this client's shard

    def probe_loss() -> float:
        set_active_adapter(loaded.model, client.adapter)
        with torch.no_grad():
            logits = loaded.model(input_ids=probe.input_ids, attention_mask=probe.attention_mask).logits
        total, count = target_token_loss(logits, probe.labels)
        return float(total / count)

    before = probe_loss()
    history = federation.engine.local_steps(5)
    after = probe_loss()
    assert len(history) == 5 and all(torch.isfinite(torch.tensor(h)).all() for h in history)
    assert after < before - 0.1, (before, after, history)


def test_a_part_with_both_ends_of_a_tied_weight_holds_one_copy(smollm2):
    """A U-shaped client loads the embeddings and the head: SmolLM2 ties them, so one tensor."""
    _, full, _ = smollm2
    part = loading.load_part("smollm2-135m", [0, 29], embedding=True, head=True, with_tokenizer=False).model
    assert part.lm_head.weight is part.model.embed_tokens.weight
    assert torch.equal(part.lm_head.weight, full.model.lm_head.weight)
