"""Quantized frozen blocks (client_quant, server_quant): split training with int8 / nf4 client
blocks equals the same quantized whole model; the memory model counts quantized bytes; a run
resumes exactly; bad values are refused in one sentence."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.checks import check
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import lora_layers, set_active_adapter, wrap_frozen_linears
from hsplitlora.lora.quant import quantize, quantized_bytes
from hsplitlora.losses import target_token_loss
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.split import split_model

from .test_split import adapter_grads, unsplit_reference

# Split and whole model compute the same ops on the same quantized weights: only float reordering.
SPLIT_TOLERANCE = 1e-5


def quantized_reference(family, tokenizer, batch, kind, client_blocks, num_layers):
    """The whole model with `client_blocks` computed from `kind` weights and the rest from float
    weights: its loss and adapter gradients, and the float model's loss."""
    model, float_loss, _ = unsplit_reference(family, tokenizer, batch, num_layers)
    wrap_frozen_linears(model)  # the MLP's frozen weights are quantized too
    for index, block in enumerate(architecture_of(model).blocks(model)):
        for layer in lora_layers(block):
            layer.quant = kind if index in client_blocks else "none"
    set_active_adapter(model, "a")
    output = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels)
    output.loss.backward()
    expected = adapter_grads(model, "a")
    model.zero_grad(set_to_none=True)
    return model, output.loss.detach(), expected, float_loss.detach()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_split_with_quantized_client_blocks_equals_quantized_whole_model(family, kind, tokenizer, batch):
    for split_point in (1, 3):
        model, reference, expected, float_loss = quantized_reference(
            family, tokenizer, batch, kind, set(range(split_point)), num_layers=4
        )
        assert abs(float(reference - float_loss)) > 1e-6  # the quantized blocks do change the model
        client, server = split_model(model, split_point)
        client.quant = kind  # the server's blocks stay float (server_quant none)
        set_active_adapter(model, "a")
        hidden = client(batch.input_ids, batch.attention_mask)
        received = hidden.detach().requires_grad_(True)
        total, count = target_token_loss(server(received, batch.attention_mask), batch.labels)
        (total / count).backward()
        hidden.backward(received.grad)
        got = adapter_grads(model, "a")
        torch.testing.assert_close(total / count, reference, atol=SPLIT_TOLERANCE, rtol=0)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=SPLIT_TOLERANCE, rtol=0, msg=key)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_u_split_with_quantized_client_blocks_equals_quantized_whole_model(family, kind, tokenizer, batch):
    split_point, tail = 2, 1  # the client computes blocks 0, 1 and 4 from quantized weights
    model, reference, expected, _ = quantized_reference(family, tokenizer, batch, kind, {0, 1, 4}, num_layers=5)
    client, server = split_model(model, split_point, tail)
    client.quant = kind
    set_active_adapter(model, "a")
    h1 = client.front(batch.input_ids, batch.attention_mask)
    h1_received = h1.detach().requires_grad_(True)
    h2 = server(h1_received, batch.attention_mask)
    h2_received = h2.detach().requires_grad_(True)
    total, count = target_token_loss(client.tail(h2_received, batch.attention_mask), batch.labels)
    (total / count).backward()
    h2.backward(h2_received.grad)
    h1.backward(h1_received.grad)
    got = adapter_grads(model, "a")
    torch.testing.assert_close(total / count, reference, atol=SPLIT_TOLERANCE, rtol=0)
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], atol=SPLIT_TOLERANCE, rtol=0, msg=key)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_quantized_weight_is_close_and_its_bytes_are_known(kind):
    weight = torch.randn(96, 80, generator=torch.Generator().manual_seed(0)) * 0.02
    quantized = quantize(weight, kind)
    error = float((quantized.dequantize() - weight).norm() / weight.norm())
    assert error < {"int8": 0.01, "nf4": 0.12}[kind]
    assert quantized.nbytes == quantized_bytes(96, 80, kind, 4)
    assert quantized.nbytes < weight.numel() * 4 / {"int8": 3.7, "nf4": 7}[kind]  # scales: 4 bytes a row, a block


def test_held_weight_merges_by_requantizing_and_frees_the_float_weight(tokenizer):
    from hsplitlora.lora.attach import attach_lora

    from .conftest import build_tiny

    model = build_tiny("llama", tokenizer)
    candidates = attach_lora(model, ["q"])
    candidate = next(iter(candidates.values()))
    layer = model.get_submodule(candidate.module)
    x = torch.randn(3, layer.in_features)
    layer.quant = "nf4"
    shared = layer(x)  # computed from the float weight's quantized copy
    float_weight = layer.weight(candidate.slot).clone()
    layer.hold_quantized("nf4")
    assert layer.base.weight.numel() == 0 and layer.frozen_bytes() == quantized_bytes(*float_weight.shape, "nf4", 4)
    torch.testing.assert_close(layer(x), shared, atol=0, rtol=0)
    delta = torch.randn_like(float_weight) * 0.01
    layer.merge(candidate.slot, delta)
    expected = quantize(quantize(float_weight, "nf4").dequantize() + delta, "nf4").dequantize()
    torch.testing.assert_close(layer.weight(candidate.slot), expected, atol=0, rtol=0)


def test_bad_quantization_is_refused_in_one_sentence(tmp_path, capsys):
    from .test_settings import one_sentence, run_cli

    assert run_cli("run", "--model", "tiny", "--client-quant", "int4", "--output-dir", str(tmp_path / "r")) == 2
    one_sentence(capsys.readouterr().err, "client_quant 'int4' is unknown; choose none, int8 or nf4.")
    assert not (tmp_path / "r").exists()
    with pytest.raises(UsageError, match=r"^client_quant 'int4' is unknown; choose none, int8 or nf4\.$"):
        check(RunConfig(model="tiny", client_quant="int4"))
    with pytest.raises(UsageError, match=r"^server_quant 'fp8' is unknown; choose none, int8 or nf4\.$"):
        check(RunConfig(model="tiny", server_quant="fp8"))
    with pytest.raises(UsageError, match=r"client_quant nf4 .* ft trains every weight"):
        check(RunConfig(model="tiny", client_quant="nf4", strategy="ft"))


def test_quantized_run_resumes_exactly_and_exports_the_weights_it_computed_with(tmp_path):
    from hsplitlora.rounds import resume_config, run

    values = dict(model="tiny", local_steps=2, clients=2, budgets="8MB,12MB", val_size=8, batch_size=4,
                  client_quant="nf4", server_quant="int8")  # fmt: skip
    straight = run(RunConfig(rounds=3, output_dir=str(tmp_path / "straight"), **values)).metrics
    first = RunConfig(rounds=2, output_dir=str(tmp_path / "split"), **values)
    run(first)
    resumed = run(resume_config(first.output_dir, rounds=3), resume=True).metrics
    assert len(straight) == 3
    for a, b in zip(straight, resumed, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-9)
    # The export holds what each holder computed with: the float master dequantized through the
    # first client's nf4 (its blocks, block 0 among them) or the main server's int8 (the rest).
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "straight" / "model.safetensors")
    master = {k.removeprefix("weight/"): v for k, v in
              load_file(tmp_path / "straight" / "checkpoint" / "weights.safetensors").items()
              if k.startswith("weight/")}  # fmt: skip
    kinds = {}
    for name, weight in exported.items():
        kinds[name] = [k for k in ("nf4", "int8") if torch.equal(weight, quantize(master[name], k).dequantize())]
        assert len(kinds[name]) == 1, name
    assert all(kinds[n] == ["nf4"] for n in exported if ".layers.0." in n)
    assert any(kind == ["int8"] for kind in kinds.values())
    plain = run(RunConfig(rounds=3, output_dir=str(tmp_path / "float"), **{**values, "client_quant": "none",
                                                                          "server_quant": "none"})).metrics  # fmt: skip
    assert straight[-1]["val_loss"] != plain[-1]["val_loss"]  # the quantized blocks were used
    assert straight[-1]["val_loss"] == pytest.approx(plain[-1]["val_loss"], rel=0.05)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_memory_model_counts_quantized_blocks_and_the_planner_cuts_deeper(kind, tokenizer):
    from hsplitlora.lora.attach import attach_lora
    from hsplitlora.method.memory import measure_memory_model
    from hsplitlora.method.planner import choose_split_point

    from .conftest import build_tiny

    model = build_tiny("llama", tokenizer, num_layers=8)
    candidates = attach_lora(model, ["q", "v"])
    plain = measure_memory_model(model, candidates, 1, 4)  # short batches: the weights dominate
    quant = plain.with_quant(kind, kind)
    # P_block's linear weights at 1 byte (int8) or half a byte (nf4) each, plus their scales.
    block = architecture_of(model).blocks(model)[1]
    linear = sum(p.numel() for n, p in block.named_parameters() if p.dim() == 2)
    others = plain.block_bytes - 4 * linear
    assert others >= 0
    ratio = {"int8": 1.0, "nf4": 0.5}[kind]
    assert linear * ratio + others < quant.block_bytes_as(kind) <= linear * ratio * 1.125 + others  # + scales
    saved = 3 * (plain.block_bytes - quant.block_bytes_as(kind)) - quant.dequantized_bytes
    assert quant.client_bytes(3) == plain.client_bytes(3) - saved
    assert quant.server_frozen_bytes(3) < plain.server_frozen_bytes(3)
    # A budget that holds 2 float blocks holds more quantized ones.
    budget = int(plain.client_bytes(2) / 0.75) + 1  # the planner keeps rho = 0.25 of it for adapters
    assert choose_split_point(plain, budget, 0.25, 1) == 2
    assert choose_split_point(quant, budget, 0.25, 1) > 2


def test_plan_counts_quantized_blocks_and_refuses_a_bad_kind(capsys):
    from .test_settings import one_sentence, run_cli

    args = ("plan", "--model", "tiny", "--budgets", "6MB", "--uniform-importance", "--split-rule", "deepest")
    assert run_cli(*args) == 0
    plain = capsys.readouterr().out
    assert run_cli(*args, "--client-quant", "nf4") == 0
    quantized = capsys.readouterr().out
    assert plain != quantized  # the nf4 client's blocks are predicted smaller
    assert run_cli(*args, "--client-quant", "int3") == 2
    one_sentence(capsys.readouterr().err, "client_quant 'int3' is unknown; choose none, int8 or nf4.")


# Ray against in-process with quantized blocks: tests/test_sampling.py (with sampling and re-plans).
