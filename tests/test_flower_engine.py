"""The Flower engine in Flower's simulation runtime: each client's host built once on its node and
kept across every message of the run, a malformed reply leaving its client out of the round, and
the engine refused for a centralised strategy. (Its numbers equal the in-process golden metrics:
tests/test_golden.py; through the deployment runtime: tests/test_flower_deployment.py.)"""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.engines import flower_engine
from hsplitlora.engines.flower_codec import decode, encode
from hsplitlora.errors import UsageError
from hsplitlora.rounds import Reporter, run

pytest.importorskip("flwr")
pytest.importorskip("ray")  # Flower's simulation runtime runs its ClientApps on Ray
from flwr.app import Message  # noqa: E402


def config(tmp_path, name, **changes) -> RunConfig:
    values = dict(model="tiny", clients=2, rounds=2, local_steps=2, budgets="5MB,20MB", val_size=16, batch_size=4,
                  split_rule="deepest", replan_delta=0.0, output_dir=str(tmp_path / name))  # fmt: skip
    return RunConfig(**{**values, **changes})


class Capture(Reporter):
    def engine_ready(self, engine):
        self.engine = engine


def test_flower_refuses_a_centralised_strategy(tmp_path):
    with pytest.raises(UsageError, match="cenlora trains one model on pooled data; the flower engine"):
        run(config(tmp_path, "central", engine="flower", strategy="cenlora", split_rule="fastest"))


FORWARDS: Counter = Counter()  # forward replies seen per client, in the ClientApps' process


def corrupt_client_one(message, context, call_next):
    """A Flower mod on every node: client 1's third forward reply carries a NaN in its activations
    (the first is round 1's importance warm-up, the second and third round 1's two steps)."""
    reply = call_next(message, context)
    cid = int(context.node_config["partition-id"])
    if message.metadata.message_type == "query.forward":
        FORWARDS[cid] += 1
        if cid == 1 and FORWARDS[cid] == 3:
            activations = decode(reply.content, "forward")
            activations.hidden.data[0, 0, 0] = float("nan")
            return Message(encode("forward", activations), reply_to=message)
    return reply


def test_a_malformed_reply_leaves_its_client_out_of_the_round_and_it_comes_back(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(flower_engine, "CLIENT_MODS", [corrupt_client_one])
    capture = Capture()
    with caplog.at_level(logging.ERROR, logger="hsplitlora.engines.flower_engine"):
        metrics = run(config(tmp_path, "faults", engine="flower"), reporter=capture).metrics
    first, second = metrics
    assert {"event": "client_lost", "client": 1, "step": 2, "round": 1} in first["events"]
    assert next(c for c in first["clients"] if c["client"] == 1)["samples"] == 0  # its upload was left out
    assert {"event": "client_restarted", "client": 1, "round": 2} in second["events"]
    assert all(c["samples"] > 0 for c in second["clients"]) and second["val_loss"] == second["val_loss"]
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert refused == ["client 1's reply to forward was refused: body.hidden.data (float32, shape [4, 128, 64]) holds "
                       "NaN or inf values."], refused  # fmt: skip
    stats = capture.engine.transport.stats  # what each node's ClientApp process saw, asked at shutdown
    assert [s["builds"] for s in stats] == [1, 2]  # client 1's host was built again, client 0's never
    assert stats[0]["calls"] > 30, stats  # every call of the run reached client 0's one host
