"""The cut is one object per client: every message a step or a validation sends across it passes
its stages, and the bytes it counts are the traffic ledger's."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.compression import Packed
from hsplitlora.config import RunConfig
from hsplitlora.roles.cut import PAYLOAD, Recorder
from hsplitlora.roles.messages import ActivationGradient, Activations, MiddleActivations, TailGradient
from hsplitlora.setup import fixed_federation

CATEGORY = {Activations: "activations", ActivationGradient: "gradients", MiddleActivations: "activations_down",
            TailGradient: "gradients_up"}  # fmt: skip


def _federation(split_mode: str, compression: str = "fp32"):
    tail = {"tail_blocks": 1} if split_mode == "u" else {}
    config = RunConfig(model="tiny", clients=2, split_point=[1, 2], rank=4, batch_size=4, split_mode=split_mode,
                       compression=compression, **tail)  # fmt: skip
    return fixed_federation(config)


@pytest.mark.parametrize("split_mode", ["standard", "u"])
def test_an_observer_on_one_client_s_cut_sees_exactly_the_messages_of_its_step(split_mode):
    federation = _federation(split_mode, "int8")
    engine = federation.engine
    recorder = Recorder()
    federation.clients[0].cut.add(recorder)
    engine.message_log = []
    before = {cid: dict(engine.traffic[cid]) for cid in (0, 1)}
    engine.step_all()
    seen = [message for message, _ in recorder.messages]
    # The protocol's own log holds both clients' messages; the cut of client 0 holds only client 0's, the same objects.
    logged = [m for m in engine.message_log if m.client_id == 0]
    assert len(seen) == len(logged) and all(a is b for a, b in zip(seen, logged, strict=True))
    expected = [Activations, ActivationGradient]
    if split_mode == "u":
        expected = [Activations, MiddleActivations, TailGradient, ActivationGradient]
    assert [type(m) for m in seen] == expected
    assert {m.step for m in seen} == {0} and not any(validation for _, validation in recorder.messages)
    # An observer after compression sees the wire form: int8 payloads with their per-token scales.
    assert all(isinstance(getattr(m, PAYLOAD[type(m)]), Packed) and getattr(m, PAYLOAD[type(m)]).mode == "int8"
               for m in seen)  # fmt: skip
    # The bytes the cut counted are the ledger's, and they are these messages' sizes.
    for cid in (0, 1):
        added = {k: engine.traffic[cid][k] - before[cid][k] for k in engine.traffic[cid]}
        sent = [m for m in engine.message_log if m.client_id == cid]
        assert added == {k: sum(m.nbytes() for m in sent if CATEGORY[type(m)] == k) for k in added}
        assert added["activations"] > 0 and added["gradients"] > 0


def test_a_stage_before_compression_changes_what_the_main_server_computes_on():
    plain = _federation("standard").engine.step_all()
    federation = _federation("standard")
    seen: list[torch.Tensor] = []

    def zero_activations(message, validation):
        if isinstance(message, Activations):
            seen.append(message.hidden)
            return type(message)(message.client_id, message.step, torch.zeros_like(message.hidden),
                                 message.attention_mask, message.labels)  # fmt: skip
        return message

    recorder = Recorder()
    federation.clients[1].cut.add(zero_activations, wire=False)
    federation.clients[1].cut.add(recorder)
    changed = federation.engine.step_all()
    # It ran on the sender's float tensor before compression; what crossed is what it returned.
    assert len(seen) == 1 and seen[0].dtype == torch.float32 and seen[0].abs().sum() > 0
    sent = recorder.messages[0][0]
    assert isinstance(sent.hidden, Packed) and torch.count_nonzero(sent.hidden.data) == 0
    # Only client 1's loss moved: the main server computed on zeros for it, and client 0's cut has no stage.
    assert changed[0] == plain[0] and changed[1] != plain[1]


@pytest.mark.parametrize("split_mode", ["standard", "u"])
def test_validation_crosses_the_cut_at_full_precision_and_outside_the_ledger(split_mode):
    federation = _federation(split_mode, "int8")
    engine = federation.engine
    recorder = Recorder()
    federation.clients[0].cut.add(recorder)
    batch = next(federation.clients[0].batches)
    before = {cid: dict(engine.traffic[cid]) for cid in (0, 1)}
    loss = engine.validation_loss([batch], 0)
    assert loss == loss and loss > 0
    expected = [Activations] + ([MiddleActivations] if split_mode == "u" else [])
    assert [type(m) for m, _ in recorder.messages] == expected
    assert all(validation and getattr(m, PAYLOAD[type(m)]).mode == "fp32" for m, validation in recorder.messages)
    assert (recorder.messages[0][0].labels is None) == (split_mode == "u")  # labels stay on a U-shaped client
    assert {cid: dict(engine.traffic[cid]) for cid in (0, 1)} == before
