"""The U-shaped split: the client keeps the first s blocks and the last t blocks, the head and the
loss; token ids, labels and logits never cross to the main server; training equals unsplit."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

from hsplitlora.checks import check
from hsplitlora.compression import Packed
from hsplitlora.config import RunConfig
from hsplitlora.data.e2e import Batcher, data_file, encode, partition_iid, read_e2e
from hsplitlora.data.sources import load_training_data
from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import attach_lora, lora_layers, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.method.memory import measure_memory_model
from hsplitlora.method.planner import plan
from hsplitlora.models.loading import load_model
from hsplitlora.models.split import split_model
from hsplitlora.roles.messages import ActivationGradient, Activations, MiddleActivations, TailGradient
from hsplitlora.rounds import run
from hsplitlora.setup import fixed_federation

from .test_split import adapter_grads, unsplit_reference


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2-sliding", "qwen3", "olmo2", "gemma2", "gemma3", "phi3"])
def test_u_split_step_equals_unsplit_model(family, tokenizer, batch):
    model, reference_loss, expected = unsplit_reference(family, tokenizer, batch, num_layers=5)

    for split_point, tail in ((1, 0), (1, 3), (2, 2), (3, 1)):
        client, server = split_model(model, split_point, tail)
        assert server.head is None and server.block_indices == list(range(split_point, 5 - tail))
        assert client.block_indices == [*range(split_point), *range(5 - tail, 5)]
        h1 = client.front(batch.input_ids, batch.attention_mask)
        h1_received = h1.detach().requires_grad_(True)
        h2 = server(h1_received, batch.attention_mask)
        h2_received = h2.detach().requires_grad_(True)
        total, count = target_token_loss(client.tail(h2_received, batch.attention_mask), batch.labels)
        (total / count).backward()
        h2.backward(h2_received.grad)
        h1.backward(h1_received.grad)
        got = adapter_grads(model, "a")
        model.zero_grad(set_to_none=True)
        torch.testing.assert_close(total / count, reference_loss, atol=1e-5, rtol=0)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], atol=1e-5, rtol=0, msg=f"{key} at s={split_point}")


def _tensors(message):
    for item in dataclasses.fields(message):
        value = getattr(message, item.name)
        if isinstance(value, Packed):
            yield item.name, value.data
            if value.scale is not None:
                yield f"{item.name}.scale", value.scale
        elif isinstance(value, torch.Tensor):
            yield item.name, value


@pytest.mark.parametrize("compression", ["fp32", "int8"])
def test_no_token_ids_labels_or_logits_cross_the_cut(compression):
    config = RunConfig(model="tiny", clients=2, split_point=[1, 2], rank=4, batch_size=4, split_mode="u",
                       tail_blocks=1, compression=compression)  # fmt: skip
    federation = fixed_federation(config)
    engine = federation.engine
    hidden, vocab = federation.loaded.model.config.hidden_size, federation.loaded.model.config.vocab_size
    assert hidden != vocab
    # Every private batch the clients will draw in these steps, drawn again from identical batchers.
    examples = read_e2e(data_file(None, "train"))
    encoded = [encode(e, federation.loaded.tokenizer, config.max_seq_len) for e in examples]
    shards = partition_iid(len(encoded), config.clients, config.seed)
    private = []
    for cid, shard in enumerate(shards):
        batcher = Batcher([encoded[i] for i in shard], config.batch_size, federation.loaded.tokenizer.pad_token_id,
                          config.seed + cid)  # fmt: skip
        private += [next(batcher) for _ in range(3)]

    engine.message_log = []
    engine.local_steps(3)
    log = engine.message_log
    kinds = [type(m) for m in log]
    assert kinds == [Activations, MiddleActivations, TailGradient, ActivationGradient] * 6
    for message in log:
        if isinstance(message, Activations):
            assert message.labels is None
        if isinstance(message, ActivationGradient):
            assert message.loss is None  # the server never sees the loss
        for name, tensor in _tensors(message):
            if name == "attention_mask":
                assert set(tensor.unique().tolist()) <= {0, 1}
                continue
            # hidden states and their gradients only: (B, T, d) or their per-token scales (B, T, 1)
            assert tensor.dtype.is_floating_point or tensor.dtype == torch.int8, name
            assert tensor.dim() == 3 and tensor.shape[-1] in (hidden, 1) and tensor.shape[-1] != vocab, name
            for batch in private:
                for secret in (batch.input_ids, batch.labels):
                    assert not (tensor.shape[:2] == secret.shape and torch.equal(tensor[..., 0].long(), secret))
    # the bytes counted are the bytes of these messages, per direction
    sizes = {Activations: "activations", MiddleActivations: "activations_down", TailGradient: "gradients_up",
             ActivationGradient: "gradients"}  # fmt: skip
    counted = {cid: dict.fromkeys(sizes.values(), 0) for cid in (0, 1)}
    for message in log:
        counted[message.client_id][sizes[type(message)]] += message.nbytes()
    for cid in (0, 1):
        for category, total in counted[cid].items():
            assert engine.traffic[cid][category] == total > 0


def test_u_shaped_training_matches_unsplit_training():
    config = RunConfig(model="tiny", clients=1, split_point=1, rank=4, batch_size=4, split_mode="u", tail_blocks=2,
                       lr=1e-2)  # fmt: skip
    federation = fixed_federation(config)
    model = federation.loaded.model
    reference = copy.deepcopy(model)  # the same weights and the same freshly created adapters
    name = "client0"
    params = [p for layer in lora_layers(reference) for p in layer.adapter_parameters(name)]
    assert params and all(p.requires_grad for p in params)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    data = load_training_data(config, federation.loaded.tokenizer)  # the client's own examples, as it reads them
    batcher = Batcher([data.items[i] for i in data.shards[0]], config.batch_size,
                      federation.loaded.tokenizer.pad_token_id, config.seed)  # fmt: skip

    losses = [step[0] for step in federation.engine.local_steps(4)]
    expected = []
    set_active_adapter(reference, name)
    for _ in range(4):
        batch = next(batcher)
        logits = reference(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = target_token_loss(logits, batch.labels)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        expected.append(float(total.detach() / count))
    assert losses == pytest.approx(expected, abs=1e-5)
    assert len(set(losses)) > 1  # the adapters did train
    trained = {n: p for n, p in model.named_parameters() if f".{name}" in n}
    for n, p in reference.named_parameters():
        if f".{name}" in n:
            torch.testing.assert_close(trained[n], p, atol=1e-5, rtol=0, msg=n)


def test_memory_model_counts_both_client_ends():
    loaded = load_model("tiny")
    candidates = attach_lora(loaded.model, ["q", "v"])
    memory = measure_memory_model(loaded.model, candidates, 4, 32)
    u = memory.with_tail(1)
    block = memory.block_bytes + memory.block_activation_bytes
    extra_head = memory.norm_bytes if memory.head_tied else memory.head_bytes
    assert u.client_bytes(2) == memory.client_bytes(2) + block + extra_head + memory.head_activation_bytes
    assert u.server_bytes(2) == memory.server_bytes(2) - memory.block_activation_bytes - memory.head_activation_bytes
    assert set(u.client_side(1)) == {n for n, c in candidates.items() if c.block in (0, 3)}
    assert set(u.server_side(1)) == {n for n, c in candidates.items() if c.block in (1, 2)}
    # The planner cuts no deeper than L - 1 - t, and ranks the tail's candidates on the client.
    result = plan(dict.fromkeys(candidates, 1.0), [10**9], u, 10**9)
    client = result.clients[0]
    assert client.split_point == 2 and result.tail_blocks == 1
    assert set(client.ranks) == set(u.client_side(2)) and set(client.server_ranks) == set(u.server_side(2))
    assert client.predicted_bytes == u.client_bytes(2, client.ranks)


# In process: the U-shape over Ray equals it in tests/test_golden.py (ray/splitlora-u).
def test_u_shaped_rounds_plan_aggregate_and_evaluate(tmp_path):
    config = RunConfig(model="tiny", rounds=2, local_steps=2, clients=2, budgets="8MB,12MB", val_size=8, batch_size=4,
                       split_mode="u", tail_blocks=1, output_dir=str(tmp_path / "run"))  # fmt: skip
    result = run(config)
    plan_line = result.metrics[0]["clients"]
    assert all(c["tail_blocks"] == 1 and 1 <= c["split_point"] <= 2 for c in plan_line)
    assert all(c["bytes_activations_down"] > 0 and c["bytes_gradients_up"] > 0 for c in plan_line)
    assert all(c["predicted_bytes"] <= c["budget_bytes"] for c in plan_line)
    assert result.metrics[-1]["val_ppl"] < result.metrics[0]["val_ppl"] * 1.5
    saved = json.loads((result.run_dir / "config.json").read_text())
    assert saved["split_mode"] == "u" and saved["resolved"]["memory_model"]["tail_blocks"] == 1


def test_u_shape_is_refused_where_it_cannot_apply(tmp_path):
    with pytest.raises(UsageError, match="split_mode u needs a strategy that splits"):
        check(RunConfig(model="tiny", strategy="hetlora", split_mode="u"))
    with pytest.raises(UsageError, match="split_mode 'w' is unknown"):
        RunConfig(model="tiny", split_mode="w").validate()
    with pytest.raises(UsageError, match=r"tail_blocks 3 is out of range.*\[0, 2\]"):
        run(RunConfig(model="tiny", split_mode="u", tail_blocks=3, output_dir=str(tmp_path / "r")))
    with pytest.raises(UsageError, match=r"split point 3 is out of range.*\[1, 2\]"):
        fixed_federation(RunConfig(model="tiny", clients=1, split_point=3, split_mode="u", tail_blocks=1))


@pytest.mark.parametrize("strategy", ["hsplitlora", "splitlora"])
def test_u_shaped_resume_continues_exactly(strategy, tmp_path):
    from hsplitlora.rounds import resume_config

    values = dict(model="tiny", local_steps=2, clients=2, budgets="8MB,12MB", val_size=8, batch_size=4,
                  split_mode="u", tail_blocks=1, strategy=strategy)  # fmt: skip
    straight = run(RunConfig(rounds=3, output_dir=str(tmp_path / "straight"), **values)).metrics
    first = RunConfig(rounds=2, output_dir=str(tmp_path / "split"), **values)
    run(first)
    resumed = run(resume_config(first.output_dir, rounds=3), resume=True).metrics
    for a, b in zip(straight, resumed, strict=True):
        assert a["val_loss"] == pytest.approx(b["val_loss"], abs=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-9)


def test_time_model_moves_the_tail_and_head_to_the_client():
    from hsplitlora.method.planner import ClientPlan
    from hsplitlora.time_model import client_flops_per_token, server_flops_per_token

    loaded = load_model("tiny")
    candidates = attach_lora(loaded.model, ["q", "v"])
    memory = measure_memory_model(loaded.model, candidates, 4, 32)
    u = memory.with_tail(1)
    hidden, vocab = loaded.model.config.hidden_size, loaded.model.config.vocab_size
    client = ClientPlan(0, 10**9, 2, {}, 0)
    block = 4 * memory.block_bytes / memory.dtype_bytes
    head = 4 * hidden * vocab
    assert client_flops_per_token(memory, client, vocab, hidden) == pytest.approx(2 * block)
    assert client_flops_per_token(u, client, vocab, hidden) == pytest.approx(3 * block + head)
    assert server_flops_per_token(memory, client, vocab, hidden) == pytest.approx(2 * block + head)
    assert server_flops_per_token(u, client, vocab, hidden) == pytest.approx(1 * block)
