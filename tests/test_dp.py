"""Differential privacy (method.md section 10): per-example clipping of the activations and of the
adapters' gradients, noise of the configured scale, the accountant against an independent
library, and runs with DP through both engines and across a resume."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from hsplitlora.config import RunConfig, make_config
from hsplitlora.errors import UsageError
from hsplitlora.lora.layer import MultiLoRALayer
from hsplitlora.privacy.dp import DPSGD, ActivationNoise, calibrate, epsilon, keep_per_example
from hsplitlora.roles.messages import Activations


class TwoLayers(nn.Module):
    """x -> LoRA linear -> tanh -> LoRA fused linear (two slots) -> sum of squares per example."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = MultiLoRALayer(nn.Linear(6, 5))
        self.second = MultiLoRALayer(nn.Linear(5, 4), {"q": 3, "k": 1})
        for layer in (self.first, self.second):
            for p in layer.base.parameters():
                p.requires_grad_(False)
        generator = torch.Generator().manual_seed(1)
        self.first.set_adapter("c", "main", 3, 8.0, generator)
        self.second.set_adapter("c", "q", 2, 8.0, generator)
        self.second.set_adapter("c", "k", 1, 8.0, generator)
        with torch.no_grad():  # B = 0 at creation would make every gradient of A zero
            for layer in (self.first, self.second):
                for slot in layer.slot_bounds:
                    layer.lora_B[slot]["c"].normal_(generator=generator)
        self.second.set_anchor("c", "k")  # an anchored adapter: its B0 A0 term carries no gradient
        with torch.no_grad():
            self.second.lora_A["k"]["c"].add_(0.1)
        for layer in (self.first, self.second):
            layer.active_adapter = "c"

    def losses(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x))).pow(2).sum(dim=(1, 2))


def by_hand(model: TwoLayers, x: torch.Tensor, clip: float) -> list[torch.Tensor]:
    """Each example's gradient on its own, clipped jointly to `clip`, summed, over the batch size."""
    params = [p for layer in (model.first, model.second) for p in layer.adapter_parameters("c")]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        grads = torch.autograd.grad(model.losses(x[i : i + 1]).sum(), params)
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        factor = min(1.0, clip / float(norm))
        total = [t + factor * g for t, g in zip(total, grads, strict=True)]
    return [t / x.shape[0] for t in total]


@pytest.mark.parametrize("clip", [1e9, 0.5])
def test_dp_sgd_gradients_equal_per_example_gradients_clipped_by_hand(clip):
    model = TwoLayers()
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(2))
    expected = by_hand(model, x, clip)
    keep_per_example([model], True)
    (model.losses(x).sum() / x.shape[0]).backward()  # the DP-SGD loss: per-example sums over the batch size
    DPSGD(0.0, clip, torch.Generator().manual_seed(3)).privatize([model], "c", x.shape[0])
    params = [p for layer in (model.first, model.second) for p in layer.adapter_parameters("c")]
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-6)


def test_the_time_model_counts_the_flops_of_dp_sgd_s_per_example_gradients():
    from types import SimpleNamespace

    from torch.utils.flop_counter import FlopCounterMode

    from hsplitlora.privacy.dp import per_example_gradients
    from hsplitlora.time_model import adapter_flops_per_token

    model = TwoLayers()
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(2))
    keep_per_example([model], True)
    (model.losses(x).sum() / x.shape[0]).backward()
    with FlopCounterMode(display=False) as counter:
        per_example_gradients([model], "c")
    shapes = {"first": (6, 5), "q": (5, 3), "k": (5, 1)}  # (d_in, d_out) of each adapter's slot
    ranks = {"first": 3, "q": 2, "k": 1}
    candidates = {n: SimpleNamespace(d_in=i, d_out=o) for n, (i, o) in shapes.items()}
    with_dp, without = (SimpleNamespace(candidates=candidates, per_example=on) for on in (True, False))
    extra = adapter_flops_per_token(with_dp, ranks) - adapter_flops_per_token(without, ranks)
    assert extra * x.shape[0] * x.shape[1] == counter.get_total_flops() > 0


def test_a_dp_sgd_step_over_several_batches_clips_each_example_and_adds_the_noise_once():
    clip, batches = 0.5, 3
    model = TwoLayers()
    x = torch.randn(6, 7, 6, generator=torch.Generator().manual_seed(2))
    expected = by_hand(model, x, clip)  # the six examples as one batch, clipped one by one
    params = [p for layer in (model.first, model.second) for p in layer.adapter_parameters("c")]
    optimizer = torch.optim.SGD(params, lr=1.0)
    before = [p.detach().clone() for p in params]
    keep_per_example([model], True)
    dpsgd = DPSGD(0.0, clip, torch.Generator().manual_seed(3), batches)
    stepped = []
    for part in x.split(2):  # three batches of two examples: one logical batch of six
        (model.losses(part).sum() / part.shape[0]).backward()
        stepped.append(dpsgd.privatize([model], "c", part.shape[0]))
        if not stepped[-1]:
            assert all(p.grad is None for p in params)  # nothing for the optimizer until the step is whole
    assert stepped == [False, False, True] and dpsgd.steps == 1
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-6)
    optimizer.step()
    assert all(not torch.equal(p, b) for p, b in zip(params, before, strict=True))
    # The noise is drawn once a logical batch, over its examples: sigma C / 6 a coordinate.
    model, sigma = TwoLayers(), 2.0
    keep_per_example([model], True)
    dpsgd = DPSGD(sigma, clip, torch.Generator().manual_seed(7), batches)
    for _ in range(batches):
        (model.losses(torch.zeros(2, 7, 6)).sum() / 2).backward()
        dpsgd.privatize([model], "c", 2)
    noise = torch.cat([p.grad.flatten() for p in model.first.adapter_parameters("c")])
    assert float(noise.std()) == pytest.approx(sigma * clip / 6, rel=0.25)


@pytest.mark.parametrize("hosts", [1, 2])
def test_dp_sgd_noise_has_the_configured_scale_and_the_seed_fixes_it(hosts):
    sigma, clip, batch = 2.0, 0.3, 4
    grads = []
    for _ in range(2):
        model = TwoLayers()
        keep_per_example([model], True)
        x = torch.zeros(batch, 7, 6)  # zero input: every clean gradient is zero, the gradient is the noise
        (model.losses(x).sum() / batch).backward()
        dpsgd = DPSGD(sigma, clip, torch.Generator().manual_seed(7), hosts=hosts)
        dpsgd.privatize([model], "c", batch)
        grads.append(torch.cat([p.grad.flatten() for p in model.first.adapter_parameters("c")]))
        assert dpsgd.steps == 1
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)
    std = float(grads[0].std())
    # Each host's coordinates are its own: the noise on them is sigma C whatever share of C it clips to.
    assert std == pytest.approx(sigma * clip / batch, rel=0.25)


def test_a_host_holding_a_share_of_a_client_s_adapters_clips_each_example_to_its_share():
    clip = 0.5
    model = TwoLayers()
    x = torch.randn(5, 7, 6, generator=torch.Generator().manual_seed(2))
    expected = by_hand(model, x, clip / math.sqrt(2))
    keep_per_example([model], True)
    (model.losses(x).sum() / x.shape[0]).backward()
    DPSGD(0.0, clip, torch.Generator().manual_seed(3), hosts=2).privatize([model], "c", x.shape[0])
    params = [p for layer in (model.first, model.second) for p in layer.adapter_parameters("c")]
    for param, want in zip(params, expected, strict=True):
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-6)


def test_a_host_without_adapters_for_the_client_still_counts_its_steps():
    dpsgd = DPSGD(1.0, 1.0, torch.Generator().manual_seed(0), batches=2, hosts=2)
    assert [dpsgd.privatize([nn.Linear(2, 2)], "c", 4) for _ in range(4)] == [False, True, False, True]
    assert dpsgd.steps == 2


def test_an_epoch_serves_whole_logical_batches_so_none_holds_an_example_twice():
    from hsplitlora.data.e2e import Batcher, Encoded

    items = [Encoded([i + 1] * (1 + i % 5), [i + 1] * (1 + i % 5)) for i in range(11)]  # 4 batches of 3: 3, 3, 3, 2

    def triples(batcher):
        return [[int(t) for _ in range(3) for t in next(batcher).input_ids[:, 0]] for _ in range(20)]

    assert all(len(x) == len(set(x)) for x in triples(Batcher(items, 3, 0, seed=5, group=3)))
    # Without it, three consecutive batches cross an epoch's end and may hold an example twice.
    assert any(len(x) > len(set(x)) for x in triples(Batcher(items, 3, 0, seed=5)))


def test_a_restarted_client_draws_noise_no_earlier_step_used_and_bad_lost_rounds_are_refused():
    from hsplitlora.errors import MalformedMessage
    from hsplitlora.privacy.dp import LostRound, fresh_stream, noise_generator

    def draws(restart):
        return torch.randn(64, generator=noise_generator(3, "activations", 1, restart))

    streams = [draws(r) for r in range(4)]  # 0: the client's stream from the start
    for i, a in enumerate(streams):
        assert torch.equal(a, draws(i))  # the seed fixes each
        for b in streams[i + 1 :]:
            assert not set(a.tolist()) & set(b.tolist())  # no draw shared (not even a shifted copy)
    state = noise_generator(3, "server", 1).get_state()  # what the driver moves on without the seed
    assert not torch.equal(fresh_stream(state, 1), fresh_stream(state, 2))
    assert torch.equal(fresh_stream(state, 1), fresh_stream(state, 1))
    assert not torch.equal(fresh_stream(state, 1), state)
    assert LostRound.from_dict({"steps": 2, "stream": 3}) == LostRound(2, 3)
    for bad in ({"steps": -1, "stream": 3}, {"steps": 2}, {"steps": True, "stream": 1}, [2, 3]):
        with pytest.raises(MalformedMessage, match="lost round"):
            LostRound.from_dict(bad)


def test_each_example_s_activation_is_clipped_and_noised_at_the_configured_scale():
    hidden = torch.randn(6, 9, 16, generator=torch.Generator().manual_seed(0)) * 5
    message = Activations(0, 0, hidden, torch.ones(6, 9, dtype=torch.long), None)
    clipped = ActivationNoise(0.0, 2.0, torch.Generator().manual_seed(1))(message, validation=False).hidden
    assert float(clipped.reshape(6, -1).norm(dim=1).max()) <= 2.0 + 1e-5
    noised = ActivationNoise(0.5, 2.0, torch.Generator().manual_seed(1))(message, validation=False).hidden
    assert float((noised - clipped).std()) == pytest.approx(0.5 * 2.0, rel=0.05)
    again = ActivationNoise(0.5, 2.0, torch.Generator().manual_seed(1))(message, validation=False).hidden
    assert torch.equal(noised, again)
    # Validation's activations (the evaluator's rows, not a client's shard) cross as they are.
    assert ActivationNoise(0.5, 2.0, torch.Generator())(message, validation=True).hidden is hidden


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.01, 1000), (0.7, 0.05, 200), (3.0, 0.002, 5000)])
def test_the_accountant_s_epsilon_equals_dp_accounting_s(sigma, q, steps):
    import dp_accounting

    delta = 1e-5
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))  # Opacus's default orders
    independent = dp_accounting.rdp.RdpAccountant(orders).compose(event).get_epsilon(delta)
    assert epsilon(sigma, q, steps, delta) == pytest.approx(independent, rel=0.02)


def test_a_target_epsilon_calibrates_a_sigma_that_meets_it():
    sigma = calibrate(3.0, 0.01, 500, 1e-5)
    assert epsilon(sigma, 0.01, 500, 1e-5) <= 3.0 + 1e-6
    assert epsilon(sigma * 0.9, 0.01, 500, 1e-5) > 3.0  # not a needlessly large sigma
    with pytest.raises(UsageError, match="epsilon"):
        calibrate(1e-9, 1.0, 10_000, 1e-5)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dp_activations_sigma": 1.0}, "needs dp_clip"),
        ({"dp_sgd_sigma": -1.0}, "dp_sgd_sigma must be 0"),
        ({"dp_sgd_sigma": 1.0, "dp_epsilon": 8.0}, "give one of the two"),
        ({"dp_delta": 2.0, "dp_sgd_sigma": 1.0}, "dp_delta must be in"),
        ({"dp_sgd_sigma": 1.0, "dp_batches": 3, "local_steps": 10}, "does not divide local_steps 10"),
        ({"dp_sgd_sigma": 1.0, "dp_batches": 0}, "dp_batches"),
    ],
)
def test_bad_dp_settings_are_refused_with_one_sentence(values, message):
    with pytest.raises(UsageError, match=message):
        make_config(values)


def test_dp_settings_without_their_mechanism_or_with_a_strategy_that_cannot_use_them_are_refused():
    from hsplitlora.checks import check

    with pytest.raises(UsageError, match="DP-SGD is off"):
        check(make_config({"dp_grad_clip": 0.5}), {"dp_grad_clip"})
    with pytest.raises(UsageError, match="DP-SGD is off"):
        check(make_config({"dp_batches": 2}), {"dp_batches"})
    with pytest.raises(UsageError, match="trains every weight"):
        check(make_config({"strategy": "ft", "dp_sgd_sigma": 1.0}))
    with pytest.raises(UsageError, match="nothing crosses"):
        check(make_config({"strategy": "hetlora", "dp_activations_sigma": 1.0, "dp_clip": 10.0}))


def _dp_config(tmp_path, name, **changes) -> RunConfig:
    values = dict(model="tiny", clients=2, rounds=2, local_steps=2, budgets="5MB,20MB", val_size=16, batch_size=4,
                  dp_activations_sigma=0.05, dp_clip=20.0, dp_sgd_sigma=0.5, dp_grad_clip=1.0,
                  output_dir=str(tmp_path / name))  # fmt: skip
    values.update(changes)
    return RunConfig(**values)


KEYS = ("train_loss", "val_loss", "val_ppl", "sim_time_s", "bytes_up", "bytes_down")


@pytest.mark.parametrize("split_mode", ["standard", "u"])
def test_a_run_with_both_kinds_of_dp_trains_reports_epsilons_and_resumes_exactly(tmp_path, split_mode):
    from hsplitlora.rounds import resume_config, run

    u = {"split_mode": "u", "tail_blocks": 1, "budgets": "8MB,20MB"} if split_mode == "u" else {}
    straight = run(_dp_config(tmp_path, "straight", rounds=3, **u))
    if split_mode == "standard":  # the noise is there (one split mode is enough to see it)
        plain = run(_dp_config(tmp_path, "plain", rounds=3, dp_activations_sigma=0.0, dp_clip=None, dp_sgd_sigma=0.0))
        assert [m["val_loss"] for m in straight.metrics] != [m["val_loss"] for m in plain.metrics]
    assert all(math.isfinite(m["val_loss"]) for m in straight.metrics)
    first = _dp_config(tmp_path, "split", **u)
    run(first)
    resumed = run(resume_config(first.output_dir, rounds=3), resume=True).metrics
    for a, b in zip(straight.metrics, resumed, strict=True):
        for key in KEYS:
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["round"], key)
    privacy = straight.summary["privacy"]
    assert json.loads((straight.run_dir / "summary.json").read_text())["privacy"] == privacy
    for row in privacy["clients"]:
        # 3 rounds x 2 steps with adapters; the activations also cross in round 1's warm-up step.
        assert row["sgd"]["steps"] == 6 and row["activations"]["steps"] == 7
        q = 4 / row["shard_size"]
        assert row["sgd"]["epsilon"] == pytest.approx(epsilon(0.5, q, 6, 1 / row["shard_size"]))
        assert row["delta"] == pytest.approx(1 / row["shard_size"])


def test_a_run_whose_dp_sgd_steps_span_two_batches_accounts_for_its_logical_batch(tmp_path):
    from hsplitlora.rounds import run

    result = run(_dp_config(tmp_path, "logical", dp_activations_sigma=0.0, dp_clip=None, dp_batches=2))
    for row in result.summary["privacy"]["clients"]:
        # 2 rounds x 2 batches: two noisy steps, each over 2 x 4 examples of the shard.
        q = 8 / row["shard_size"]
        assert row["sgd"]["steps"] == 2 and row["sgd"]["sample_rate"] == pytest.approx(q)
        assert row["sgd"]["epsilon"] == pytest.approx(epsilon(0.5, q, 2, 1 / row["shard_size"]))
    assert all(math.isfinite(m["val_loss"]) for m in result.metrics)
    with pytest.raises(UsageError, match="more than client"):
        run(_dp_config(tmp_path, "too-large", dp_activations_sigma=0.0, dp_clip=None, local_steps=1000,
                       dp_batches=1000, rounds=1))  # fmt: skip


def test_a_target_epsilon_holds_for_every_client(tmp_path):
    from hsplitlora.rounds import run

    result = run(_dp_config(tmp_path, "target", dp_activations_sigma=0.0, dp_clip=None, dp_sgd_sigma=0.0,
                            dp_epsilon=8.0))  # fmt: skip
    privacy = result.summary["privacy"]
    assert privacy["dp"]["sgd_sigma"] > 0
    assert all(row["sgd"]["epsilon"] <= 8.0 + 1e-6 for row in privacy["clients"])


# -- the privacy floor in ARMSC -------------------------------------------------------------------
def _curve(tmp_path, points: dict[int, float], model: str = "tiny", labels: float = 0.0):
    path = tmp_path / f"leakage-{len(list(tmp_path.glob('leakage-*')))}.json"
    curve = [{"cut": c, "token_recovery": v, "token_recovery_with_labels": max(v, labels)} for c, v in points.items()]
    path.write_text(json.dumps({"model": model, "standard": curve, "u": curve}))
    return str(path)


def test_the_floor_is_the_shallowest_cut_from_which_every_deeper_cut_leaks_at_most_the_bound():
    from hsplitlora.privacy.floor import leakage_at, leakage_floor

    curve = {1: 0.9, 2: 0.6, 4: 0.3, 8: 0.35, 16: 0.1}
    assert leakage_at(curve, 3) == 0.6 and leakage_at(curve, 12) == 0.35 and leakage_at(curve, 20) == 0.1
    assert leakage_floor(curve, 0.4, 20) == 4  # cut 3, between 2 (0.6) and 4 (0.3), is estimated at 0.6
    assert leakage_floor(curve, 0.34, 20) == 16  # cuts 9-15 take the larger neighbour, 8's 0.35
    assert leakage_floor(curve, 0.05, 20) is None


def test_a_plan_with_a_privacy_floor_puts_no_client_above_it_and_names_the_one_that_cannot_hold_it(tmp_path):
    from hsplitlora.method.planner import InfeasibleClientError
    from hsplitlora.rounds import run

    path = _curve(tmp_path, {1: 0.9, 2: 0.5, 3: 0.1})
    values = dict(model="tiny", clients=2, rounds=1, local_steps=1, val_size=8, batch_size=4, strategy="hsplitlora",
                  budgets="20MB,20MB", leakage_curve=path, max_leakage=0.5, split_rule="fastest")  # fmt: skip
    result = run(RunConfig(**values, output_dir=str(tmp_path / "floor")))
    assert all(c["split_point"] >= 2 for m in result.metrics for c in m["clients"])
    with pytest.raises(InfeasibleClientError, match="client 0"):
        run(RunConfig(**{**values, "budgets": "3MB,20MB", "max_leakage": 0.1}, output_dir=str(tmp_path / "small")))
    with pytest.raises(UsageError, match="labels alone"):  # the labels give the response away at every cut
        run(RunConfig(**{**values, "max_leakage": 0.1, "leakage_curve": _curve(tmp_path, {1: 0.05}, labels=0.3)},
                      output_dir=str(tmp_path / "labels")))  # fmt: skip
    with pytest.raises(UsageError, match="measured for model"):
        run(RunConfig(**{**values, "leakage_curve": _curve(tmp_path, {1: 0.1}, model="smollm2-135m")},
                      output_dir=str(tmp_path / "other")))  # fmt: skip


def test_plan_prints_each_client_s_cut_with_its_measured_leakage(tmp_path, capsys):
    from hsplitlora.cli import main

    path = _curve(tmp_path, {1: 0.9, 2: 0.5, 3: 0.1})
    code = main(["plan", "--model", "tiny", "--budgets", "20MB,20MB", "--uniform-importance", "--leakage-curve", path,
                 "--max-leakage", "0.5"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "leakage" in out
    rows = [line for line in out.splitlines() if "MB" in line and "│" in line]
    assert rows and all(line.rstrip(" │").split()[-1] in ("0.500", "0.100") for line in rows)
