"""Rounds: NAA merged into the model, every strategy end to end, reproducibility, checkpoints,
partitions and device profiles."""

from __future__ import annotations

import json

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.data.e2e import Example, mr_attributes, partition_dirichlet, partition_iid
from hsplitlora.devices import PRESETS, resolve_devices
from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import ExactChange, dense_average
from hsplitlora.reporting import RunFolder
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.rounds import Reporter, candidate_weights, run
from hsplitlora.setup import fixed_federation
from hsplitlora.strategies import STRATEGIES

TINY_BUDGETS = "5MB,6MB,8MB,12MB,20MB"
FIELDS = {"round", "strategy", "train_loss", "val_loss", "val_ppl", "sim_time_s", "wall_time_s", "bytes_up",
          "bytes_down", "clients"}  # fmt: skip


def tiny_config(tmp_path, **changes) -> RunConfig:
    values = dict(model="tiny", rounds=2, local_steps=2, budgets=TINY_BUDGETS, val_size=16, batch_size=4,
                  output_dir=str(tmp_path / "run"))  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


def test_naa_merges_exactly_the_weighted_sum_of_every_clients_update():
    config = RunConfig(model="tiny", clients=3, split_point=[1, 2, 3], rank=[2, 4, 8], batch_size=4)
    federation = fixed_federation(config)
    engine = federation.engine
    model = federation.loaded.model
    engine.local_steps(2)
    before = candidate_weights(model, federation.candidates)
    uploads = [u for c in federation.clients for u in (c.upload(), federation.server.upload(c.client_id))]
    expected = {name: dense_average(f) for name, f in FedServer.by_candidate(uploads).items()}
    assert len(expected) == len(federation.candidates)  # every candidate was trained by someone
    engine.aggregate(1)
    after = candidate_weights(model, federation.candidates)
    for name, delta in expected.items():
        torch.testing.assert_close(after[name] - before[name], delta, atol=1e-6, rtol=1e-5)
    # Every holder of a block (each client whose cut is past it, the main server for the others)
    # sees the same merged weight.
    from hsplitlora.method.importance import candidate_layers

    for name, candidate in federation.candidates.items():
        holders = [candidate_layers(c.part, federation.candidates).get(name) for c in federation.clients]
        holders += [candidate_layers(p, federation.candidates).get(name) for p in federation.server.parts.values()]
        weights = [h.weight(candidate.slot) for h in holders if h is not None]
        assert len(weights) == 3  # three clients: on the client side for some, on the server for the rest
        for weight in weights:
            torch.testing.assert_close(weight, after[name], atol=0, rtol=0)
    # Samples weight the clients: three clients, equal batches, so p_i = 1/3 each.
    assert {u.samples for u in uploads} == {8}


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_strategy_runs_two_rounds_and_writes_the_run_folder(strategy, tmp_path):
    result = run(tiny_config(tmp_path, strategy=strategy))
    lines = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    for line in lines:
        assert set(line) >= FIELDS and line["strategy"] == strategy
        assert line["val_ppl"] > 1 and line["sim_time_s"] > 0
        assert (line["bytes_up"] > 0) == (strategy not in ("cenlora", "ft"))
    for name in ("config.json", "summary.json", "model.safetensors", "val_ppl.png", "plan.png",
                 "checkpoint/state.json", "checkpoint/weights.safetensors"):  # fmt: skip
        assert (result.run_dir / name).is_file(), name
    cuts = [c["split_point"] for c in lines[0]["clients"]]
    if strategy in ("splitlora", "no-armsc"):  # one cut and one rank for everyone
        assert len(set(cuts)) == 1 and cuts[0] < 4
        ranks = {c["client_rank_total"] for c in lines[0]["clients"]}
        assert len(ranks) == 1 and ranks.pop() > 0  # a cut that leaves room for a positive rank
    if strategy in ("hsplitlora", "no-iwi", "no-naa"):  # the fastest cuts within every budget
        assert all(c["predicted_bytes"] <= c["budget_bytes"] for c in lines[0]["clients"])
    if strategy in ("hetlora", "flora", "flexlora"):  # ranks follow budgets 5, 6, 8, 12, 20 MB: 4, 4, 4, 8, 16
        assert [c["client_rank_total"] // 16 for c in lines[0]["clients"]] == [4, 4, 4, 8, 16]
    if strategy in ("hetlora", "flora", "flexlora", "fedlora", "cenlora", "ft"):  # the whole model (4 blocks)
        assert set(cuts) == {4}
        assert len(cuts) == (1 if strategy in ("cenlora", "ft") else 5)
    if strategy in ("cenlora", "ft"):  # centralised: nothing crosses a network
        assert all(m["bytes_up"] == 0 and m["bytes_down"] == 0 for m in lines)


@pytest.mark.parametrize("strategy", ["hsplitlora", "no-iwi", "no-naa"])
def test_the_deepest_split_rule_gives_heterogeneous_budgets_heterogeneous_cuts(strategy, tmp_path):
    lines = run(tiny_config(tmp_path, strategy=strategy, split_rule="deepest", rounds=1)).metrics
    assert len({c["split_point"] for c in lines[0]["clients"]}) > 1


def test_the_same_seed_gives_the_same_numbers(tmp_path):
    first = run(tiny_config(tmp_path / "a", seed=3)).metrics
    second = run(tiny_config(tmp_path / "b", seed=3)).metrics
    other = run(tiny_config(tmp_path / "c", seed=4)).metrics
    for a, b in zip(first, second, strict=True):
        assert a["train_loss"] == b["train_loss"] and a["val_loss"] == b["val_loss"]
    assert first[-1]["val_loss"] != other[-1]["val_loss"]


def test_weakest_budget_below_any_cut_stops_before_training(tmp_path):
    with pytest.raises(UsageError, match="client 0 cannot take part"):
        run(tiny_config(tmp_path, budgets="1MB,20MB,20MB,20MB,20MB"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_interrupted_checkpoint_leaves_the_last_one_loadable(tmp_path):
    folder = RunFolder(tmp_path)
    folder.save_checkpoint({"round": 1}, {"w": torch.ones(2)})
    folder.save_checkpoint({"round": 2}, {"w": torch.full((2,), 2.0)})
    # A crash in the middle of the next save: a half-written staging folder and temporary file.
    (tmp_path / ".checkpoint-abc").mkdir()
    (tmp_path / ".checkpoint-abc" / ".weights.safetensors.x").write_bytes(b"\x00" * 10)
    state, tensors = folder.load_checkpoint()
    assert state == {"round": 2} and torch.equal(tensors["w"], torch.full((2,), 2.0))
    # A crash between the two renames: only the previous checkpoint is there, under its old name.
    (tmp_path / "checkpoint").rename(tmp_path / ".checkpoint-old")
    state, _ = folder.load_checkpoint()
    assert state == {"round": 2}


def test_dirichlet_partition_is_skewed_and_covers_every_example_once(train_examples):
    shards = partition_dirichlet(train_examples, 5, alpha=0.3, seed=0)
    assert sorted(i for s in shards for i in s) == list(range(len(train_examples)))

    def food_share(shard):
        foods = [mr_attributes(train_examples[i].mr).get("food", "") for i in shard]
        return max(foods.count(f) for f in set(foods)) / len(foods)

    iid = partition_iid(len(train_examples), 5, seed=0)
    assert sum(map(food_share, shards)) > sum(map(food_share, iid))
    assert partition_dirichlet(train_examples, 5, alpha=0.3, seed=0) == shards


def test_mr_attributes():
    assert mr_attributes(Example("name[The Eagle], food[Italian]", "").mr) == {"name": "The Eagle", "food": "Italian"}


def test_devices_from_presets_budgets_and_overrides():
    assert resolve_devices(5, preset="hetero5") == PRESETS["hetero5"]
    devices = resolve_devices(3, budgets="1GB", overrides={1: {"budget": "2GB", "flops": 1e12}})
    assert [d.budget_bytes for d in devices] == [10**9, 2 * 10**9, 10**9] and devices[1].flops == 1e12
    with pytest.raises(UsageError, match="override for client 7"):
        resolve_devices(3, budgets="1GB", overrides={7: {"budget": "1GB"}})


RESUME_KEYS = ("round", "train_loss", "val_loss", "val_ppl", "sim_time_s", "bytes_up", "bytes_down", "replanned")


@pytest.mark.parametrize("strategy", ["hsplitlora", "splitlora", "flora", "flexlora", "ft"])
def test_resume_continues_exactly_where_the_run_stopped(strategy, tmp_path):
    # hsplitlora re-plans when importance moves (ranks resize), and its adapters, anchors and
    # optimizer state persist: all of it must come back from the checkpoint.
    changes = {"replan_delta": 0.0} if strategy == "hsplitlora" else {}
    straight = run(tiny_config(tmp_path / "straight", strategy=strategy, rounds=4, **changes)).metrics
    first = tiny_config(tmp_path / "split", strategy=strategy, rounds=2, **changes)
    run(first)
    from hsplitlora.rounds import resume_config

    resumed = run(resume_config(first.output_dir, rounds=4), resume=True).metrics
    assert [m["round"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        for key in RESUME_KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["round"], key)
        for ca, cb in zip(a["clients"], b["clients"], strict=True):
            assert ca["split_point"] == cb["split_point"] and ca["client_rank_total"] == cb["client_rank_total"]


def test_resume_of_a_folder_without_checkpoint_is_refused(tmp_path):
    from hsplitlora.rounds import resume_config

    with pytest.raises(UsageError, match="cannot resume"):
        resume_config(tmp_path)


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    from hsplitlora.engines.inprocess import InProcessEngine
    from hsplitlora.rounds import TrainingDiverged

    calls = {"n": 0}
    original = InProcessEngine.step_all

    def diverging(self):
        if self.plans[0].round == 0:  # the warm-up's importance step is not a training step
            return original(self)
        calls["n"] += 1
        losses = original(self)
        return losses if calls["n"] <= 2 else [losses[0], float("nan"), *losses[2:]]  # round 2, step 1

    monkeypatch.setattr(InProcessEngine, "step_all", diverging)
    config = tiny_config(tmp_path, rounds=3)
    with pytest.raises(TrainingDiverged, match=r"client 1's loss became nan at round 2, step 1"):
        run(config)
    state, _ = RunFolder(config.output_dir).load_checkpoint()
    assert state["round"] == 1


def test_a_max_seq_len_that_cuts_off_every_reference_is_refused(tmp_path):
    with pytest.raises(UsageError, match="max_seq_len 16 cuts every training example before its response starts"):
        run(tiny_config(tmp_path, max_seq_len=16))
    assert not (tmp_path / "run").exists()


def test_persistent_adapters_every_holder_starts_from_the_merged_weight_and_dw_is_the_weighted_change():
    from hsplitlora.method.importance import candidate_layers
    from hsplitlora.roles.messages import ModelUpdate, RoundPlan

    config = RunConfig(model="tiny", clients=3, split_point=[1, 2, 3], rank=[2, 4, 8], batch_size=4)
    federation = fixed_federation(config)
    engine, model, candidates = federation.engine, federation.loaded.model, federation.candidates
    engine.fed_server = FedServer(ExactChange())

    server = federation.server

    def holders(name):
        """(adapter, layer) of every holder of a candidate: the clients whose cut is past its block,
        the main server's part for the others."""
        found = [(c.adapter, candidate_layers(c.part, candidates).get(name)) for c in federation.clients]
        found += [(f"client{cid}", candidate_layers(p, candidates).get(name)) for cid, p in server.parts.items()]
        return [(adapter, layer) for adapter, layer in found if layer is not None]

    for round_ in (1, 2, 3):
        ranks = [2, 4, 8] if round_ < 3 else [4, 2, 8]  # round 3 resizes two clients' adapters
        engine.configure([RoundPlan(cid, round_, s, dict.fromkeys(candidates, r), None, "anchor")
                          for cid, (s, r) in enumerate(zip([1, 2, 3], ranks, strict=True))])  # fmt: skip
        engine.local_steps(2)
        before = candidate_weights(model, candidates)
        expected = {}
        for name, candidate in candidates.items():
            changes = [layer.delta(adapter, candidate.slot).double() for adapter, layer in holders(name)]
            assert len(changes) == 3
            expected[name] = sum(changes) / 3  # equal samples: p_i = 1/3
        update = engine.aggregate(round_)
        assert isinstance(update, ModelUpdate)
        after = candidate_weights(model, candidates)
        for name, candidate in candidates.items():
            delta = update.deltas[name]
            sent = (delta if isinstance(delta, torch.Tensor) else delta.dense()).double()
            error = torch.linalg.norm(sent - expected[name]) / torch.linalg.norm(expected[name])
            assert error <= 1e-6, (round_, name, float(error))
            torch.testing.assert_close(after[name] - before[name], sent.float(), atol=1e-6, rtol=1e-4)
            for adapter, layer in holders(name):  # every holder's adapter sits at its anchor again
                assert torch.equal(layer.delta(adapter, candidate.slot), torch.zeros_like(after[name]))


def test_factor_averaging_strategies_start_every_client_from_the_same_adapter():
    from hsplitlora.method.importance import candidate_layers
    from hsplitlora.roles.messages import RoundPlan

    config = RunConfig(model="tiny", clients=3, split_point=[1, 2, 3], rank=[2, 4, 8], batch_size=4)
    federation = fixed_federation(config)
    candidates = federation.candidates
    federation.engine.configure([RoundPlan(cid, 0, s, {}) for cid, s in enumerate([1, 2, 3])])  # no adapters yet
    federation.engine.configure([RoundPlan(cid, 1, s, dict.fromkeys(candidates, r), None, "overwrite")
                                 for cid, (s, r) in enumerate(zip([1, 2, 3], [2, 4, 8], strict=True))])  # fmt: skip
    name = next(n for n, c in candidates.items() if c.block == 0)
    slot = candidates[name].slot
    a = [candidate_layers(c.part, candidates)[name].lora_A[slot][c.adapter] for c in federation.clients]
    assert [x.shape[0] for x in a] == [2, 4, 8]
    assert torch.equal(a[0], a[2][:2]) and torch.equal(a[1], a[2][:4])  # a rank-r A: the first r rows


class Recorded:
    """A client's real batch stream, recording the unpadded rows of every batch it serves."""

    def __init__(self, batcher, served: list):
        self.batcher, self.served = batcher, served

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.batcher)
        self.served.append(tuple(tuple(row[mask.bool()].tolist()) for row, mask in
                                 zip(batch.input_ids, batch.attention_mask, strict=True)))  # fmt: skip
        return batch

    def __getattr__(self, name):  # state(), load_state(), items: the Batcher's own
        return getattr(self.batcher, name)


class RecordBatches(Reporter):
    """Records what every client's training and warm-up streams serve during a run."""

    def engine_ready(self, engine):
        self.served, self.shards = {}, {}
        for host in engine.transport.clients:
            client = host.client
            self.shards[client.client_id] = {tuple(item.input_ids) for item in client.batches.items}
            client.batches = Recorded(client.batches, self.served.setdefault((client.client_id, "train"), []))
            client.warmup_batches = Recorded(client.warmup_batches,
                                             self.served.setdefault((client.client_id, "warm-up"), []))  # fmt: skip


def test_one_seed_gives_every_strategy_the_same_training_batches_and_the_warm_up_draws_its_own(tmp_path):
    changes = dict(clients=3, budgets="8MB,16MB,32MB", seed=5)
    with_warm_up, without = RecordBatches(), RecordBatches()
    run(tiny_config(tmp_path / "h", **changes), reporter=with_warm_up)
    run(tiny_config(tmp_path / "s", strategy="splitlora", **changes), reporter=without)
    for cid in range(3):
        trained = with_warm_up.served[(cid, "train")]
        assert len(trained) == 2 * 2  # rounds x local steps: the warm-up took none of them
        assert trained == without.served[(cid, "train")]
        warm_up = with_warm_up.served[(cid, "warm-up")]
        assert len(warm_up) == 1 and without.served[(cid, "warm-up")] == []
        assert all(row in with_warm_up.shards[cid] for row in warm_up[0])  # the client's own shard: private
