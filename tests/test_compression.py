"""Compressed activations and gradients across the cut: round-trip error bounds, byte counts that
equal what is sent, and training that still works."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.checks import check
from hsplitlora.compression import MODES, pack
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.setup import fixed_federation


def sample(seed: int, scale: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 7, 16, generator=generator) * scale
    x[0, 0, 0] = 40 * scale  # one outlier per tensor, as hidden states have
    return x


@given(st.integers(0, 10_000), st.sampled_from([1e-8, 1e-3, 1.0, 300.0]))
@settings(max_examples=40, deadline=None)
def test_int8_round_trip_error_is_at_most_half_a_step_of_each_tokens_scale(seed, scale):
    x = sample(seed, scale)
    packed = pack(x, "int8")
    assert packed.data.dtype == torch.int8 and packed.scale.shape == (3, 7, 1)
    error = (packed.unpack() - x).abs()
    bound = x.abs().amax(dim=-1, keepdim=True) / 254
    assert torch.all(error <= bound * (1 + 1e-5) + 1e-30)


@given(st.integers(0, 10_000), st.sampled_from([1e-9, 1e-4, 1.0, 1e4]))
@settings(max_examples=40, deadline=None)
def test_fp16_and_bf16_round_trips_are_within_their_documented_bounds(seed, scale):
    x = sample(seed, scale)
    fp16 = (pack(x, "fp16").unpack() - x).abs()  # scaled by the absmax: no underflow for tiny gradients
    assert torch.all(fp16 <= x.abs().amax() * 2**-11 * 1.01)
    bf16 = (pack(x, "bf16").unpack() - x).abs()
    assert torch.all(bf16 <= x.abs() * 2**-8 * 1.01)
    assert torch.equal(pack(x, "fp32").unpack(), x)


def test_packed_sizes_are_the_bytes_of_payload_and_scales():
    x = torch.randn(2, 5, 8)
    assert pack(x, "fp32").nbytes() == 2 * 5 * 8 * 4
    assert pack(x, "fp16").nbytes() == 2 * 5 * 8 * 2 + 4
    assert pack(x, "bf16").nbytes() == 2 * 5 * 8 * 2
    assert pack(x, "int8").nbytes() == 2 * 5 * 8 + 2 * 5 * 4


@pytest.mark.parametrize("mode", MODES)
def test_byte_counts_match_the_tensors_sent_and_training_still_learns(mode):
    config = RunConfig(model="tiny", clients=2, split_point=[1, 2], rank=4, batch_size=4, compression=mode)
    federation = fixed_federation(config)
    engine, server = federation.engine, federation.server
    sent = {0: [0, 0], 1: [0, 0]}
    original = server.step

    def recording(message):
        assert message.hidden.mode == mode
        gradient = original(message)
        assert gradient.grad.mode == mode
        extra = message.attention_mask.numel() * message.attention_mask.element_size() + (
            message.labels.numel() * message.labels.element_size()
        )
        sent[message.client_id][0] += message.hidden.data.numel() * message.hidden.data.element_size() + extra
        sent[message.client_id][1] += gradient.grad.data.numel() * gradient.grad.data.element_size()
        if mode in ("fp16", "int8"):
            for packed in (message.hidden, gradient.grad):
                sent[message.client_id][packed is gradient.grad] += packed.scale.numel() * 4
        return gradient

    server.step = recording
    losses = engine.local_steps(6)
    for cid, (up, down) in sent.items():
        assert engine.traffic[cid]["activations"] == up
        assert engine.traffic[cid]["gradients"] == down
    assert sum(losses[-1]) < sum(losses[0])


def test_unknown_compression_is_refused_with_the_choices():
    with pytest.raises(UsageError, match="compression 'int4' is unknown; choose one of fp32, fp16, bf16, int8"):
        check(RunConfig(model="tiny", compression="int4"))
