"""Client sampling (method.md section 7): clients_per_round of K train each round, drawn from the
seed and the round; p_i is over them; the others keep their adapters and optimizer state and merge
the update; the time model, bytes, metrics and resume account for it."""

from __future__ import annotations

import math

import pytest
import torch

from hsplitlora.cli import main
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import ExactChange
from hsplitlora.method.importance import candidate_layers
from hsplitlora.method.sampling import per_round, sample_clients
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.messages import ModelUpdate, RoundPlan
from hsplitlora.rounds import candidate_weights, resume_config, run
from hsplitlora.setup import fixed_federation

TINY = dict(model="tiny", local_steps=2, budgets="5MB,6MB,8MB,12MB,20MB", val_size=16, batch_size=4)


def test_the_draw_is_fixed_by_seed_and_round_and_differs_between_seeds():
    draws = {seed: [sample_clients(seed, r, 10, 4) for r in range(1, 21)] for seed in (0, 1)}
    assert draws[0] == [sample_clients(0, r, 10, 4) for r in range(1, 21)]  # the same seed draws the same
    assert draws[0] != draws[1]
    for drawn in draws[0]:
        assert len(drawn) == 4 and drawn == sorted(set(drawn)) and all(0 <= c < 10 for c in drawn)
    assert len({tuple(d) for d in draws[0]}) > 1  # rounds draw different clients
    assert sample_clients(3, 7, 5, 5) == list(range(5))


@pytest.mark.parametrize(
    "setting, clients, count",
    [(None, 5, 5), (2, 5, 2), (5, 5, 5), (1, 5, 1), (0.5, 5, 2), (1.0, 5, 5), (0.3, 10, 3), (0.01, 5, 1)],  # fmt: skip
)
def test_a_count_or_a_fraction_of_the_clients(setting, clients, count):
    assert per_round(setting, clients) == count


@pytest.mark.parametrize("value", [0, 6, 1.5, math.nan, -0.5, 0.0, math.inf])
def test_a_bad_clients_per_round_is_refused_in_one_sentence(value):
    with pytest.raises(UsageError) as error:
        RunConfig(model="tiny", clients=5, clients_per_round=value).validate()
    message = str(error.value)
    assert message.startswith("clients_per_round must be a count of clients from 1 to 5 or a fraction in (0, 1]")
    assert message.endswith(f"got {value!r}.")


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


@pytest.mark.parametrize("text", ["0", "6", "1.5", "nan"])
def test_the_flag_refuses_a_bad_value_with_exit_2(text, capsys, tmp_path):
    assert run_cli("run", "--model", "tiny", "--clients-per-round", text, "--output-dir", str(tmp_path / "r")) == 2
    err = capsys.readouterr().err
    assert "clients_per_round must be a count of clients from 1 to 5" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_the_flag_keeps_a_count_apart_from_a_fraction():
    from hsplitlora.cli import _count_or_fraction

    assert _count_or_fraction("1") == 1 and isinstance(_count_or_fraction("1"), int)
    assert _count_or_fraction("1.0") == 1.0 and isinstance(_count_or_fraction("1.0"), float)


def _adapter_state(federation, cid: int) -> dict[str, torch.Tensor]:
    """Client `cid`'s adapters, anchors and AdamW state on both sides of its cut."""
    client, server = federation.clients[cid], federation.server
    state = {f"client/{k}": v for k, v in client.holder.adapter_state(client.part, client.adapter,
                                                                         client.optimizer).items()}  # fmt: skip
    state.update({f"server/{k}": v for k, v in server.holder.adapter_state(
        server.parts[cid], client.adapter, server.optimizers[cid]).items()})  # fmt: skip
    return state


def test_unsampled_clients_keep_their_state_and_p_i_is_over_the_sampled_ones():
    config = RunConfig(model="tiny", clients=3, split_point=[1, 2, 3], rank=[2, 4, 8], batch_size=4)
    federation = fixed_federation(config)
    engine, model, candidates = federation.engine, federation.loaded.model, federation.candidates
    engine.fed_server = FedServer(ExactChange())

    def configure(round_):
        engine.configure([RoundPlan(cid, round_, s, dict.fromkeys(candidates, r), None, "anchor")
                          for cid, (s, r) in enumerate(zip([1, 2, 3], [2, 4, 8], strict=True))])  # fmt: skip

    def changes(cids):
        """The adapters' changes from their anchors, per candidate, of clients `cids`."""
        found = {}
        for name, c in candidates.items():
            layers = [(f"client{cid}", candidate_layers(federation.clients[cid].part, candidates).get(name))
                      for cid in cids]  # fmt: skip
            layers += [(f"client{cid}", candidate_layers(federation.server.parts[cid], candidates).get(name))
                       for cid in cids]  # fmt: skip
            found[name] = [layer.delta(adapter, c.slot).double() for adapter, layer in layers if layer is not None]
        return found

    configure(1)  # round 1: everyone trains, so client 1 has an anchor and AdamW moments to keep
    engine.local_steps(2)
    engine.aggregate(1)
    kept = _adapter_state(federation, 1)
    assert any(k.endswith("exp_avg") for k in kept) and any(k.endswith("A0") for k in kept)

    for round_, sampled in ((2, [0, 2]), (3, [1, 2])):
        engine.reset_traffic()
        configure(round_)
        engine.sample(sampled)
        history = engine.local_steps(2)
        assert all((loss is None) == (cid not in sampled) for losses in history for cid, loss in enumerate(losses))
        if round_ == 2:
            assert {k: engine.round_counters()[1][k] for k in ("samples", "tokens")} == {"samples": 0, "tokens": 0}
        expected = {name: sum(found) / len(sampled) for name, found in changes(sampled).items()}  # equal samples
        before = candidate_weights(model, candidates)
        update = engine.aggregate(round_)
        assert isinstance(update, ModelUpdate)
        after = candidate_weights(model, candidates)
        for name, delta in expected.items():
            torch.testing.assert_close((after[name] - before[name]).double(), delta, atol=1e-6, rtol=1e-4)
        if round_ == 2:  # client 1 did not train: only the merged update changed what it computes with
            now = _adapter_state(federation, 1)
            assert now.keys() == kept.keys()
            for key, value in kept.items():
                assert torch.equal(now[key], value), key
            assert engine.traffic[1]["adapters_up"] == 0 and engine.traffic[1]["adapters_down"] > 0
    # Client 1's anchor did not move while it sat out, so the fed server still held it and its
    # round-3 upload carried its factors alone, no anchor.
    factors = [v for k, v in kept.items() if k.startswith("client/") and k.endswith(("/A", "/B"))]
    assert engine.traffic[1]["adapters_up"] == sum(t.numel() * t.element_size() for t in factors)


def _run(tmp_path, name, **changes):
    return run(RunConfig(**{**TINY, **changes, "output_dir": str(tmp_path / name)}))


def test_a_sampled_run_records_who_trained_and_times_only_them(tmp_path):
    metrics = _run(tmp_path, "run", rounds=3, clients_per_round=2).metrics
    drawn = [m["sampled_clients"] for m in metrics]
    assert drawn == [sample_clients(0, r, 5, 2) for r in (1, 2, 3)] and len({tuple(d) for d in drawn}) > 1
    for line in metrics:
        trained = [c for c in line["clients"] if c["client"] in line["sampled_clients"]]
        idle = [c for c in line["clients"] if c["client"] not in line["sampled_clients"]]
        assert all(c["samples"] > 0 and c["bytes_adapters_up"] > 0 for c in trained)
        assert all(c["samples"] == 0 and c["sim_time_s"] is None and c["train_loss"] is None for c in idle)
        assert all(c["bytes_adapters_up"] == c["bytes_activations"] == 0 for c in idle)
        assert all(c["bytes_adapters_down"] > 0 for c in idle)  # they merge the update like everyone
        assert line["round_sim_time_s"] == max([c["sim_time_s"] for c in trained] + [line["server_busy_s"]])
    everyone = _run(tmp_path, "all", rounds=1).metrics[0]
    assert "sampled_clients" not in everyone
    assert metrics[0]["server_busy_s"] < everyone["server_busy_s"]  # the server is shared by 2 of 5


@pytest.mark.parametrize(
    "strategy, extra",
    [("hsplitlora", {}), ("hetlora", {}), ("hsplitlora", {"update_form": "svd-ef", "update_rank": 2})],
)
def test_a_sampled_run_stopped_and_resumed_equals_an_uninterrupted_one(strategy, extra, tmp_path):
    # hsplitlora's anchors move for the sampled clients only; hetlora's unsampled clients of a higher
    # rank take the broadcast; svd-ef's residual comes back from the checkpoint.
    changes = dict(strategy=strategy, clients_per_round=0.4, replan_delta=0.0, **extra)
    straight = _run(tmp_path, "straight", rounds=4, **changes).metrics
    _run(tmp_path, "split", rounds=2, **changes)
    resumed = run(resume_config(tmp_path / "split", rounds=4), resume=True).metrics
    assert [m["round"] for m in resumed] == [1, 2, 3, 4]
    for a, b in zip(straight, resumed, strict=True):
        assert a["sampled_clients"] == b["sampled_clients"]
        for key in ("train_loss", "val_loss", "sim_time_s", "bytes_up", "bytes_down"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["round"], key)


def test_ray_and_in_process_engines_agree_with_sampling_and_quantized_blocks(tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    try:
        # Different cuts and a re-plan every round (ranks resize) with anchors moving for some clients only;
        # frozen blocks quantized (nf4 on the clients, int8 on the main server), so a block is client-side
        # for one client and server-side for another.
        changes = dict(clients=3, budgets="5MB,8MB,20MB", rounds=3, clients_per_round=2, split_rule="deepest",
                       replan_delta=0.0, client_quant="nf4", server_quant="int8")  # fmt: skip
        local = _run(tmp_path, "local", **changes).metrics
        remote = _run(tmp_path, "ray", engine="ray", **changes).metrics
    finally:
        ray.shutdown()
    assert len({tuple(m["sampled_clients"]) for m in local}) > 1
    assert len({c["split_point"] for c in local[0]["clients"]}) > 1  # quantized blocks on both sides of a cut
    for a, b in zip(local, remote, strict=True):
        assert a["sampled_clients"] == b["sampled_clients"]
        for key in ("train_loss", "val_loss", "sim_time_s", "bytes_up", "bytes_down"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["round"], key)


def test_only_round_ones_sampled_clients_run_the_importance_warm_up(tmp_path, monkeypatch):
    from hsplitlora.engines.protocol import Engine

    warmed: list[int] = []
    original = Engine.warmup_importance

    def recording(self):
        real_split_step = self.split_step

        def split_step(cid):
            warmed.append(cid)
            return real_split_step(cid)

        self.split_step = split_step
        try:
            return original(self)
        finally:
            del self.split_step

    monkeypatch.setattr(Engine, "warmup_importance", recording)
    run(RunConfig(**TINY, clients=5, clients_per_round=2, rounds=1, output_dir=str(tmp_path / "run")))
    assert warmed == sample_clients(0, 1, 5, 2)  # round 1's two clients, once each
