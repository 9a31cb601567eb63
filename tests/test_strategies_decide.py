"""Strategies decide: who trains on what, which clients train, what starts a round and what is
exported are the strategy's answers, and its (aggregation, adapters) pair is checked in one place."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hsplitlora.devices import DeviceProfile
from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import ZERO_PAD_TRUNCATE, ExactChange, MergedZeroPad, TruncatedChange
from hsplitlora.strategies import STRATEGIES, StrategyContext
from hsplitlora.strategies.base import Strategy, check_update_rule
from hsplitlora.strategies.federated import FedLoRA
from hsplitlora.time_model import Workload
from tests.test_planner import MEMORY

DEVICES = [DeviceProfile(3_000_000 + 1_000_000 * i, 1e9, 1e8) for i in range(3)]
SERVER = DeviceProfile(20_000_000, 2e13, 1e12)
WORKLOAD = Workload(steps=10, tokens_per_step=40.0, padded_tokens_per_step=64.0, hidden_size=64, vocab_size=256,
                    server_flops=2e13)  # fmt: skip


def context(**changes) -> StrategyContext:
    base = StrategyContext(MEMORY, DEVICES, 20_000_000, (0, 2, 4, 8, 16), 0.25, 1, 0.1, workload=WORKLOAD,
                           full_finetune_lr=1e-5)  # fmt: skip
    return replace(base, **changes)


@pytest.mark.parametrize("lifecycle", ["persist", "recreate"])
def test_every_strategy_builds_with_a_pair_its_adapters_can_follow(lifecycle):
    for name, cls in STRATEGIES.items():
        strategy = cls(context(adapter_lifecycle=lifecycle))
        check_update_rule(name, strategy.aggregation, strategy.adapters)  # raises on a pair it cannot follow
        # The memory model counts anchors exactly when the adapters keep one.
        assert strategy.context.memory.anchored == (strategy.adapters == "anchor"), name


def test_no_naa_follows_the_life_cycle_with_its_own_pair():
    persist, recreate = (STRATEGIES["no-naa"](context(adapter_lifecycle=life)) for life in ("persist", "recreate"))
    assert (persist.aggregation, persist.adapters) == (ZERO_PAD_TRUNCATE, "overwrite")
    assert isinstance(recreate.aggregation, MergedZeroPad) and recreate.adapters == "recreate"
    hsplitlora = STRATEGIES["hsplitlora"](context(adapter_lifecycle="persist"))
    assert isinstance(hsplitlora.aggregation, ExactChange) and hsplitlora.adapters == "anchor"


def test_a_pair_whose_adapters_cannot_follow_the_update_is_refused():
    class MergedButOverwritten(Strategy):  # a merged change would be counted again by kept factors
        name = "merged-but-overwritten"
        aggregation = ExactChange()
        adapters = "overwrite"

    class AveragedButAnchored(FedLoRA):  # averaged factors are not a change measured from an anchor
        name = "averaged-but-anchored"
        adapters = "anchor"

    with pytest.raises(ValueError, match="pairs ExactChange, which merges, reads anchors, with adapters 'overwrite'"):
        MergedButOverwritten(context())
    with pytest.raises(ValueError, match="pairs FactorAverage, which averages, with adapters 'anchor'; it admits "
                                         "overwrite"):  # fmt: skip
        AveragedButAnchored(context())
    with pytest.raises(ValueError, match="admits recreate"):
        check_update_rule("merged-zero-pad", MergedZeroPad(), "anchor")


def test_svd_ef_replaces_naas_exact_change_and_is_refused_where_factors_are_averaged():
    truncated = TruncatedChange(2)
    assert STRATEGIES["hsplitlora"](context(truncated_update=truncated)).aggregation is truncated
    with pytest.raises(UsageError, match="update_form svd-ef truncates NAA's exact change, and no-naa"):
        STRATEGIES["no-naa"](context(truncated_update=truncated))


def test_a_centralised_strategy_pools_the_data_on_one_trainer_and_the_others_keep_the_shards():
    shards = [[4, 0], [1, 5], [2, 3]]
    pooled = STRATEGIES["cenlora"].arrange(shards, DEVICES, 2, SERVER)
    assert (pooled.shards, pooled.devices, pooled.steps_per_round) == ([[0, 1, 2, 3, 4, 5]], [SERVER], 6)
    assert "cenlora is a centralised reference" in pooled.note
    for name in ("hsplitlora", "hetlora"):
        kept = STRATEGIES[name].arrange(shards, DEVICES, 2, SERVER)
        assert (kept.shards, kept.devices, kept.steps_per_round, kept.note) == (shards, DEVICES, 2, "")


def test_one_trainer_neither_samples_nor_aggregates_and_federated_strategies_do():
    central = STRATEGIES["ft"](context())
    federated = STRATEGIES["flora"](context())
    assert central.sample(0, 1, 1, 1) is None and not central.aggregates()
    assert federated.sample(0, 1, 3, 2) == federated.sample(0, 1, 3, 2) and len(federated.sample(0, 1, 3, 2)) == 2
    assert federated.sample(0, 1, 3, None) is None and federated.aggregates()


def test_only_full_fine_tuning_sends_a_learning_rate_in_its_round_plans_and_exports_every_weight():
    for name, cls in STRATEGIES.items():
        strategy = cls(context())
        plan = strategy.make_plan(dict.fromkeys(MEMORY.candidates, 1.0))
        messages = strategy.round_plans(plan.clients, 3, None)
        assert [m.client_id for m in messages] == [c.client for c in plan.clients]
        assert {m.adapters for m in messages} == {strategy.adapters} and {m.round for m in messages} == {3}
        expected = 1e-5 if name == "ft" else None
        assert {m.full_finetune_lr for m in messages} == {expected}, name
        assert strategy.export_format() == ("full" if name == "ft" else "candidates")


def test_only_strategies_that_split_federated_clients_send_across_a_cut():
    crossing = sorted(name for name, cls in STRATEGIES.items() if cls.crosses_cut())
    assert crossing == ["hsplitlora", "no-armsc", "no-armsc-paper", "no-iwi", "no-naa", "splitlora", "splitlora-paper"]


def test_the_warm_up_runs_for_importance_planning_unless_ranks_are_fixed():
    assert STRATEGIES["hsplitlora"](context()).warms_up()
    assert not STRATEGIES["hsplitlora"](context(fixed_ranks=[4, 4, 4])).warms_up()
    assert STRATEGIES["hsplitlora"](context(fixed_ranks=[4, 4, 4])).measures_importance()
    assert not STRATEGIES["splitlora"](context()).warms_up()


def test_a_fully_fine_tuned_run_says_so_in_its_weights_and_refuses_an_adapter_export(tmp_path):
    from hsplitlora.config import RunConfig
    from hsplitlora.evaluation.export import export_adapter
    from hsplitlora.evaluation.run_eval import weights_format
    from hsplitlora.rounds import run

    runs = {name: run(RunConfig(model="tiny", strategy=name, clients=2, rounds=1, local_steps=1, batch_size=2,
                                val_size=4, output_dir=str(tmp_path / name))).run_dir
            for name in ("ft", "fedlora")}  # fmt: skip
    assert weights_format(runs["ft"] / "model.safetensors") == "full"
    assert weights_format(runs["fedlora"] / "model.safetensors") == "candidates"
    with pytest.raises(UsageError, match="a fully fine-tuned run changed every weight"):
        export_adapter(runs["ft"], tmp_path / "adapter", rank=2)
