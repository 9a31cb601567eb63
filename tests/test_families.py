"""Issue 15: the model families people fine-tune today (Qwen3, Gemma 2, Gemma 3, Phi-3, OLMo 2)
work through the memory model, the planner and `--model PATH`. Split equivalence for each is in
test_split.py and test_ushape.py."""

from __future__ import annotations

import json

import pytest

from hsplitlora.cli import main
from hsplitlora.config import ALL_TARGETS
from hsplitlora.lora.attach import attach_lora
from hsplitlora.method.memory import measure_memory_model
from hsplitlora.method.planner import plan
from hsplitlora.models.loading import byte_tokenizer

from .conftest import build_tiny

FAMILIES = ["qwen3", "olmo2", "gemma2", "gemma3", "phi3"]


@pytest.mark.parametrize("family", FAMILIES)
def test_memory_model_and_planner_work_on_every_family(family):
    model = build_tiny(family, byte_tokenizer())
    candidates = attach_lora(model, list(ALL_TARGETS))
    assert len(candidates) == 4 * 7  # every target of every block is its own candidate
    memory = measure_memory_model(model, candidates, batch_size=2, seq_len=32)
    assert memory.block_bytes > 0 and memory.block_activation_bytes > 0 and memory.head_activation_bytes > 0
    budget = memory.client_bytes(2, dict.fromkeys(memory.client_side(2), 4))
    result = plan(dict.fromkeys(candidates, 1.0), [budget, 2 * budget], memory, 10**9, levels=(0, 2, 4))
    for client in result.clients:
        assert 1 <= client.split_point <= 3 and client.predicted_bytes <= client.budget_bytes
        assert any(client.ranks.values())


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_a_family_trains_through_model_path(family, tmp_path):
    folder = tmp_path / family
    tokenizer = byte_tokenizer()
    build_tiny(family, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--clients", "2", "--budgets", "8MB", "--rounds", "1", "--steps", "1",
                 "--val-size", "8", "--targets", "q,v,gate,up", "--output-dir", str(out)]) == 0  # fmt: skip
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["val_ppl"] is not None and all(c["client_rank_total"] > 0 for c in line["clients"])
