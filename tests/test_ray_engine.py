"""The Ray engine: the same numbers as the in-process engine, actors holding only their blocks, and
a run that survives a client actor dying mid-round (local Ray, 2 CPUs)."""

from __future__ import annotations

import pytest
import torch

from hsplitlora.config import RunConfig
from hsplitlora.rounds import Reporter, run

ray = pytest.importorskip("ray")

BUDGETS = "5MB,8MB,20MB"  # three clients: cuts 1, 1 and 3 of the tiny model's 4 blocks


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def config(tmp_path, name, **changes) -> RunConfig:
    values = dict(model="tiny", clients=3, rounds=2, local_steps=2, budgets=BUDGETS, val_size=16, batch_size=4,
                  output_dir=str(tmp_path / name))  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


KEYS = ("train_loss", "val_loss", "val_ppl", "sim_time_s", "bytes_up", "bytes_down")


def test_ray_and_in_process_engines_agree_with_recomputing_clients(tmp_path):
    # Different cuts (deepest fit, deeper for recomputing clients) and a re-plan every round (ranks
    # resize) exercise anchors moving; the plan's recompute reaches each client actor. (Agreement of
    # the engines strategy by strategy: tests/test_golden.py's ray cases; that recomputing changes
    # no number: tests/test_recompute.py.)
    changes = {"split_rule": "deepest", "replan_delta": 0.0, "rounds": 3, "recompute": "on"}
    local = run(config(tmp_path, "local", **changes)).metrics
    remote = run(config(tmp_path, "ray", engine="ray", **changes)).metrics
    for a, b in zip(local, remote, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["round"], key)
        assert all(c["recompute"] for c in b["clients"])


def test_ray_and_in_process_engines_agree_with_both_kinds_of_dp(tmp_path):
    # The noise of each role comes from its own seeded generator, wherever the role lives (the
    # U-shaped split's DP runs the same role code: tests/test_dp.py runs it and resumes it).
    dp = dict(dp_activations_sigma=0.05, dp_clip=20.0, dp_sgd_sigma=0.5, strategy="splitlora")
    local = run(config(tmp_path, "local", **dp))
    remote = run(config(tmp_path, "ray", engine="ray", **dp))
    for a, b in zip(local.metrics, remote.metrics, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["round"], key)
    assert local.summary["privacy"] == remote.summary["privacy"]


class Capture(Reporter):
    def engine_ready(self, engine):
        self.engine = engine


def test_each_client_actor_holds_only_its_own_blocks(tmp_path):
    capture = Capture()
    run(config(tmp_path, "held", engine="ray", rounds=1, local_steps=1, split_rule="deepest"), reporter=capture)
    engine = capture.engine
    for cid, actor in enumerate(engine.actors):
        names = ray.get(actor.held_parameter_names.remote())
        blocks = {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}
        assert blocks == set(range(engine.split_points[cid])), cid
        assert "model.embed_tokens.weight" in names and not any(n.startswith("model.norm") for n in names)
    server = ray.get(engine.server.held_parameter_names.remote())
    server_blocks = {int(n.split(".")[2]) for n in server if n.startswith("model.layers.")}
    assert server_blocks == set(range(min(engine.split_points), 4)) and "model.norm.weight" in server


class KillClientOne(Reporter):
    """Kills client 1's actor at the first step of round 1."""

    def engine_ready(self, engine):
        self.engine = engine

    def step(self, round_, step, losses):
        if round_ == 1 and step == 0:
            ray.kill(self.engine.actors[1].actor)  # the actor behind the host's handle


def test_a_killed_client_does_not_stop_the_run_and_comes_back(tmp_path):
    metrics = run(config(tmp_path, "faults", engine="ray", rounds=2, local_steps=3), reporter=KillClientOne()).metrics
    first, second = metrics
    assert {"event": "client_lost", "client": 1, "step": 2, "round": 1} in first["events"]
    lost = next(c for c in first["clients"] if c["client"] == 1)
    assert lost["samples"] == 0  # its uploads were left out: the others' weights renormalise
    assert {"event": "client_restarted", "client": 1, "round": 2} in second["events"]
    back = next(c for c in second["clients"] if c["client"] == 1)
    assert back["samples"] == 3 * 4 and back["train_loss"] is not None
    assert second["val_ppl"] is not None


def test_a_restarted_client_s_dp_counts_the_round_it_was_lost_in(tmp_path):
    # Killed after its first step of round 1 and found lost at step 2, client 1 comes back in
    # round 2 from its round-1 snapshot (no steps yet): its accountant counts the lost round's two
    # batches (the one in flight included, an upper bound) and round 2's three.
    dp = dict(dp_activations_sigma=0.05, dp_clip=20.0, dp_sgd_sigma=0.5, strategy="splitlora")
    result = run(config(tmp_path, "dp-faults", engine="ray", rounds=2, local_steps=3, **dp), reporter=KillClientOne())
    assert {"event": "client_lost", "client": 1, "step": 2, "round": 1} in result.metrics[0]["events"]
    steps = {row["client"]: (row["activations"]["steps"], row["sgd"]["steps"]) for row in
             result.summary["privacy"]["clients"]}  # fmt: skip
    assert steps == {0: (6, 6), 1: (5, 5), 2: (6, 6)}


@pytest.mark.parametrize("strategy", ["splitlora", "hsplitlora"])
def test_a_run_resumed_from_a_checkpoint_written_while_a_client_was_out_equals_the_run_that_went_on(tmp_path, strategy):
    # Client 1 is lost in round 1 and out when round 1's checkpoint is written. Going on, it comes
    # back in round 2 with its adapters as round 1 began (its snapshot) and, under FedAvg, round 1's
    # averaged factors; a resume from that checkpoint must give it the same, and the same DP catch-up.
    from hsplitlora.rounds import resume_config

    dp = dict(dp_activations_sigma=0.05, dp_clip=20.0)
    straight = run(config(tmp_path, "on", engine="ray", rounds=3, local_steps=3, strategy=strategy, **dp),
                   reporter=KillClientOne()).metrics  # fmt: skip
    first = config(tmp_path, "stop", engine="ray", rounds=1, local_steps=3, strategy=strategy, **dp)
    run(first, reporter=KillClientOne())
    resumed = run(resume_config(first.output_dir, rounds=3), resume=True).metrics
    assert {"event": "client_lost", "client": 1, "step": 2, "round": 1} in resumed[0]["events"]
    for a, b in zip(straight, resumed, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["round"], key)


class KillServer(Reporter):
    """Kills the main server's actor after the first step of round 2 (once)."""

    def engine_ready(self, engine):
        self.engine = engine
        self.done = False

    def step(self, round_, step, losses):
        if round_ == 2 and step == 0 and not self.done:
            self.done = True
            ray.kill(self.engine.server.actor)


@pytest.mark.parametrize("strategy", ["hsplitlora", "splitlora"])
def test_a_killed_main_server_restarts_and_the_run_equals_an_undisturbed_one(tmp_path, strategy):
    # The undisturbed run in process: the Ray engine equals it (tests/test_golden.py, its ray cases).
    undisturbed = run(config(tmp_path, "calm", rounds=3, local_steps=3, strategy=strategy)).metrics
    killer = KillServer()
    disturbed = run(config(tmp_path, "killed", engine="ray", rounds=3, local_steps=3, strategy=strategy),
                    reporter=killer).metrics  # fmt: skip
    assert killer.done and {"event": "server_restarted", "step": 2, "round": 2} in disturbed[1]["events"]
    for a, b in zip(undisturbed, disturbed, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-5), (a["round"], key)


class CheckHolders(Reporter):
    """After each round's aggregation: every actor holding a block has the same weight for it, and
    every adapter sits at its anchor (adds nothing), so all holders compute the merged W."""

    def engine_ready(self, engine):
        self.engine = engine
        self.checked = 0

    def round_finished(self, line):
        engine = self.engine
        names = sorted(engine.candidates)
        server = ray.get(engine.server.weights.remote(names))
        deltas = ray.get([engine.server.adapter_deltas.remote(cid) for cid in range(len(engine.actors))])
        for cid, actor in enumerate(engine.actors):
            held = ray.get(actor.weights.remote(names))
            for name, weight in held.items():
                reference = server.get(name)
                if reference is not None:
                    assert torch.equal(weight, reference), (cid, name)
            deltas.append(ray.get(actor.adapter_deltas.remote()))
        assert all(torch.count_nonzero(d) == 0 for one in deltas for d in one.values())
        self.checked += 1


def test_after_aggregation_every_ray_holder_has_the_same_effective_weight(tmp_path):
    check = CheckHolders()
    run(config(tmp_path, "holders", engine="ray", split_rule="deepest", replan_delta=0.0), reporter=check)
    assert check.checked == 2


def test_the_ray_warm_up_draws_its_own_batches_so_training_batches_match_a_run_without_warm_up(tmp_path):
    from hsplitlora.reporting import RunFolder

    warmed = run(config(tmp_path, "ray", engine="ray", rounds=1))  # hsplitlora: a warm-up pass first
    plain = run(config(tmp_path, "plain", strategy="no-iwi", rounds=1))  # no warm-up, in process
    streams = [[c["batcher"] for c in RunFolder(r.run_dir).checkpoint_state()["clients"]] for r in (warmed, plain)]
    assert streams[0] == streams[1]  # the same training batches drawn, so the same stream state after them
