"""The Flower engine (simulation runtime): the same numbers as the in-process engine, each client's
host built once on its node and kept across every message of the run, and the engine chosen and
refused by name."""

from __future__ import annotations

import json

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.rounds import Reporter, run

pytest.importorskip("flwr")
pytest.importorskip("ray")  # Flower's simulation runtime runs its ClientApps on Ray

WALL = ("wall_time_s", "round_wall_time_s")


def config(tmp_path, name, **changes) -> RunConfig:
    values = dict(model="tiny", clients=2, rounds=2, local_steps=2, budgets="5MB,20MB", val_size=16, batch_size=4,
                  split_rule="deepest", replan_delta=0.0, output_dir=str(tmp_path / name))  # fmt: skip
    return RunConfig(**{**values, **changes})


def without_wall(value):
    if isinstance(value, dict):
        return {k: without_wall(v) for k, v in value.items() if k not in WALL}
    if isinstance(value, list):
        return [without_wall(v) for v in value]
    return value


class Capture(Reporter):
    def engine_ready(self, engine):
        self.engine = engine


def test_flower_equals_in_process_and_builds_each_client_once(tmp_path):
    # Cuts 1 and 3 of the tiny model's 4 blocks; a re-plan every round resizes ranks (anchors move).
    local = run(config(tmp_path, "local")).metrics
    capture = Capture()
    flower = run(config(tmp_path, "flower", engine="flower"), reporter=capture).metrics
    assert without_wall(json.loads(json.dumps(flower))) == without_wall(json.loads(json.dumps(local)))
    stats = capture.engine.transport.stats  # what each node's ClientApp process saw, asked at shutdown
    assert [s["builds"] for s in stats] == [1, 1]
    assert all(s["calls"] > 20 for s in stats), stats  # every call of the run reached the one host


def test_flower_refuses_a_centralised_strategy(tmp_path):
    with pytest.raises(UsageError, match="cenlora trains one model on pooled data; the flower engine"):
        run(config(tmp_path, "central", engine="flower", strategy="cenlora", split_rule="fastest"))
