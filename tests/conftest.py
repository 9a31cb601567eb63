"""Shared fixtures: tiny models built from a config, and a padded batch of real E2E examples."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.data.e2e import collate, data_file, encode, read_e2e
from hsplitlora.models.loading import byte_tokenizer, freeze, tiny_gpt2, tiny_llama

BUILDERS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


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
