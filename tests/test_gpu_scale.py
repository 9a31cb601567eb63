"""benchmarks/gpu_scale.py runs its whole speed path on a tiny config where there is no GPU."""

import gpu_scale
import pytest
import torch


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script measures the real sizes")
def test_gpu_scale_runs_the_tiny_config_on_the_cpu(capsys):
    assert gpu_scale.main(["--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert "no GPU here" in out
    ratio = float(out.split("RESULT gpu_split_vs_peft_ratio=")[1].split()[0])
    assert ratio > 0  # the project's split step and peft's loop both trained and were timed
    assert "gpu_memory_model_max_rel_error" not in out  # that part needs CUDA's allocator


def test_flops_per_token_counts_blocks_head_and_adapters():
    model = gpu_scale.build("tiny", torch.device("cpu"), torch.float32)
    config = model.config
    matrices = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2)  # tied: embedding once
    blocks = matrices - config.vocab_size * config.hidden_size
    expected = 4 * (blocks + config.vocab_size * config.hidden_size) + 6 * 10 + 6 * config.num_hidden_layers * 32 * 64
    assert gpu_scale.flops_per_token(model, 32, 10) == expected
