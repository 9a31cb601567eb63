"""Issue 15: bfloat16 / float16 frozen weights with float32 adapters, on this CPU."""

from __future__ import annotations

import json

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.lora.attach import attach_lora, lora_layers
from hsplitlora.method.memory import measure_memory_model
from hsplitlora.models.loading import load_model
from hsplitlora.rounds import run


def tiny_run(tmp_path, dtype: str, **changes):
    config = RunConfig(model="tiny", clients=2, budgets="5MB", rounds=1, local_steps=3, val_size=8, dtype=dtype,
                       output_dir=str(tmp_path / dtype), threads=1, **changes)  # fmt: skip
    return run(config)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_trains_within_2_percent_of_float32(tmp_path, dtype):
    full = tiny_run(tmp_path, "float32").metrics[-1]
    half = tiny_run(tmp_path, dtype).metrics[-1]
    assert half["train_loss"] == pytest.approx(full["train_loss"], rel=0.02)
    assert half["val_loss"] == pytest.approx(full["val_loss"], rel=0.02)
    config = json.loads((tmp_path / dtype / "config.json").read_text())
    assert config["dtype"] == dtype


def test_adapters_stay_float32_on_half_precision_weights():
    model = load_model("tiny", dtype="bfloat16").model
    attach_lora(model, ["q", "v"])
    layer = lora_layers(model)[0]
    layer.set_adapter("a", "main", 4, 16.0)
    assert layer.base.weight.dtype == torch.bfloat16
    assert layer.lora_A["main"]["a"].dtype == torch.float32 and layer.lora_B["main"]["a"].dtype == torch.float32
    layer.active_adapter = "a"
    out = layer(torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_memory_model_halves_the_frozen_weights_in_bfloat16():
    memories = {}
    for dtype in ("float32", "bfloat16"):
        model = load_model("tiny", dtype=dtype).model
        memories[dtype] = measure_memory_model(model, attach_lora(model, ["q", "k", "v", "o"]), 2, 32)
    full, half = memories["float32"], memories["bfloat16"]
    assert half.block_bytes * 2 == full.block_bytes and half.embedding_bytes * 2 == full.embedding_bytes
    assert half.head_bytes * 2 == full.head_bytes and half.dtype_bytes == 2
    name = next(iter(full.candidates))
    assert half.adapter_bytes(name, 8) == full.adapter_bytes(name, 8)  # adapters are float32 in both
    assert half.block_activation_bytes < full.block_activation_bytes


def test_a_bfloat16_run_exports_and_evaluates_in_bfloat16(tmp_path):
    from hsplitlora.evaluation.export import export_merged
    from hsplitlora.evaluation.run_eval import load_run_model

    result = tiny_run(tmp_path, "bfloat16")
    loaded, _ = load_run_model(result.run_dir)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    out = export_merged(result.run_dir, tmp_path / "merged")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_an_unknown_dtype_is_refused():
    from hsplitlora.checks import load_config
    from hsplitlora.errors import UsageError

    with pytest.raises(UsageError, match="dtype 'float8' is unknown; choose one of float32, bfloat16, float16"):
        load_config(None, {"dtype": "float8"})
