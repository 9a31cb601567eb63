"""Shared fixtures: tiny models built from a config, and a padded batch of real E2E examples."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hsplitlora.data.e2e import collate, data_file, encode, read_e2e
from hsplitlora.models.loading import byte_tokenizer, freeze, tiny_gpt2, tiny_llama


def _tiny_from(config_class, model_class, **extra):
    def build(vocab_size: int, num_layers: int = 4, seed: int = 0):
        config = config_class(vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                              num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, **extra)  # fmt: skip
        torch.manual_seed(seed)
        return model_class(config)

    return build


BUILDERS = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    # Qwen2: biases on q, k, v; Mistral: a sliding window shorter than the batch's sequences.
    "qwen2": _tiny_from(Qwen2Config, Qwen2ForCausalLM),
    "mistral": _tiny_from(MistralConfig, MistralForCausalLM, sliding_window=16),
    # Qwen2 with sliding-window attention on its upper layers only: masks differ per block.
    "qwen2-sliding": _tiny_from(
        Qwen2Config, Qwen2ForCausalLM, use_sliding_window=True, sliding_window=16, max_window_layers=2
    ),  # fmt: skip
    # The families of issue 15, each with what sets it apart: Qwen 3's and OLMo 2's q/k norms, Gemma's
    # scaled embeddings, sliding and global layers mixed and soft-capped logits (Gemma 3: a rotary
    # embedding per layer type), Phi-3's fused qkv and gate_up projections.
    "qwen3": _tiny_from(Qwen3Config, Qwen3ForCausalLM, head_dim=16),
    "olmo2": _tiny_from(Olmo2Config, Olmo2ForCausalLM, pad_token_id=None, bos_token_id=None, eos_token_id=256),
    "gemma2": _tiny_from(Gemma2Config, Gemma2ForCausalLM, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
                         final_logit_softcapping=30.0, pad_token_id=None, bos_token_id=None, eos_token_id=256),
    "gemma3": lambda vocab_size, num_layers=4, seed=0: _tiny_from(
        Gemma3TextConfig, Gemma3ForCausalLM, head_dim=16, sliding_window=16, query_pre_attn_scalar=16,
        final_logit_softcapping=30.0, pad_token_id=None, bos_token_id=None, eos_token_id=256,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
    )(vocab_size, num_layers, seed),
    "phi3": _tiny_from(Phi3Config, Phi3ForCausalLM, pad_token_id=None, bos_token_id=None, eos_token_id=256),
}  # fmt: skip


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture(scope="session")
def train_examples():
    return read_e2e(data_file(None, "train"))


@pytest.fixture
def batch(tokenizer, train_examples):
    """Four E2E examples of different lengths, right-padded."""
    items = [encode(train_examples[i], tokenizer, 160) for i in (0, 7, 500, 1200)]
    return collate(items, tokenizer.pad_token_id)


def build_tiny(family: str, tokenizer, num_layers: int = 4, seed: int = 0) -> torch.nn.Module:
    return freeze(BUILDERS[family](vocab_size=len(tokenizer), num_layers=num_layers, seed=seed))
