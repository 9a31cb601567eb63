"""Activation recomputation on the clients' front blocks (`recompute`): the same numbers with less
memory and one more forward; the memory model, the time model and the planner count it, and `auto`
recomputes exactly where a cut would not fit a budget otherwise."""

from __future__ import annotations

import pytest

from hsplitlora.checks import check
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.method.planner import ClientPlan, choose_split_point, plan
from hsplitlora.time_model import adapter_params, client_flops_per_token

RUN = dict(model="tiny", clients=2, rounds=2, local_steps=2, budgets="8MB,12MB", val_size=8, batch_size=4,
           split_point=[2, 3], rank=4)  # fmt: skip


@pytest.mark.parametrize("extra", [{}, {"split_mode": "u", "tail_blocks": 1, "split_point": 2}])
def test_a_recomputing_client_trains_to_the_same_numbers_and_its_round_costs_one_more_forward(tmp_path, extra):
    from hsplitlora.rounds import run

    values = {**RUN, **extra}
    kept = run(RunConfig(output_dir=str(tmp_path / "kept"), **values)).metrics
    recomputed = run(RunConfig(output_dir=str(tmp_path / "recomputed"), recompute="on", **values)).metrics
    for a, b in zip(kept, recomputed, strict=True):
        assert a["val_loss"] == b["val_loss"]  # recomputation repeats the same ops: bit for bit
        assert a["train_loss"] == b["train_loss"]
        for x, y in zip(a["clients"], b["clients"], strict=True):
            assert "recompute" not in x and y["recompute"] is True
            assert y["predicted_bytes"] < x["predicted_bytes"]  # each block keeps its input only
            assert y["sim_time_s"] > x["sim_time_s"]  # and runs its forward again


def memory_of(tokenizer, num_layers: int = 8):
    from hsplitlora.lora.attach import attach_lora
    from hsplitlora.method.memory import measure_memory_model

    from .conftest import build_tiny

    model = build_tiny("llama", tokenizer, num_layers=num_layers)
    candidates = attach_lora(model, ["q", "v", "down"])
    return measure_memory_model(model, candidates, 4, 32).with_anchors(True)


def test_the_memory_model_keeps_a_block_input_per_recomputed_block_and_one_block_s_activations(tokenizer):
    memory = memory_of(tokenizer)
    ranks = {n: 4 for n in memory.client_side(5)}
    kept = memory.client_bytes(5, ranks, recompute=False)
    recomputed = memory.client_bytes(5, ranks, recompute=True)
    assert memory.boundary_bytes == 4 * 32 * 64 * memory.dtype_bytes  # b T d of the tiny model's hidden size
    # Kept: every block's activations and every adapter's saved inputs. Recomputed: a block input per
    # block, one block's activations, and the largest block's adapter inputs; the weights, adapter
    # states and embeddings are the same.
    saved = [sum(memory.adapter_saved_bytes(n, 4) for n in ranks if memory.candidates[n].block == b) for b in range(5)]
    # (One block's activations twice: its saved tensors and, in its backward, their gradients.)
    dropped = 5 * memory.block_activation_bytes + sum(saved)
    added = 5 * memory.boundary_bytes + 2 * memory.block_activation_bytes + max(saved)
    assert kept - recomputed == dropped - added
    assert memory.client_bytes(5, ranks) == kept  # the mode is off unless asked
    assert memory.with_recompute("on").client_bytes(5, ranks) == recomputed
    # auto: a client recomputes exactly where its adapter-free memory would not fit (1 - rho) of its budget.
    auto = memory.with_recompute("auto")
    budget = int(memory.client_bytes(3, recompute=False) / 0.75) + 1
    assert not auto.recomputes(3, budget, 0.25) and auto.recomputes(4, budget, 0.25)
    # ... or where ranks a plan fixes (a uniform rank, a user's) would not fit without it.
    heavy = {n: 16 for n in memory.client_side(3)}
    assert memory.client_bytes(3, heavy, recompute=False) > budget >= memory.client_bytes(3, heavy, recompute=True)
    assert auto.recomputes(3, budget, 0.25, heavy) and not memory.recomputes(3, budget, 0.25, heavy)
    assert choose_split_point(memory, budget, 0.25, 1) == 3
    assert choose_split_point(auto, budget, 0.25, 1) > 3


def test_the_planner_cuts_deeper_where_recomputing_fits_and_every_plan_stays_within_its_budget(tokenizer):
    memory = memory_of(tokenizer)
    budgets = [int(memory.client_bytes(s, recompute=False) / 0.75) + 1 for s in (3, 4, 5)]
    importance = dict.fromkeys(memory.candidates, 1.0)
    kept = plan(importance, budgets, memory, 10**10, rho=0.25)
    auto = plan(importance, budgets, memory.with_recompute("auto"), 10**10, rho=0.25)
    assert [c.split_point for c in kept.clients] == [3, 4, 5]
    assert all(not c.recompute for c in kept.clients)
    # (At one or two blocks recomputing saves nothing: each block keeps its input and one block's
    # activations come back twice.)
    for before, after in zip(kept.clients, auto.clients, strict=True):
        assert after.split_point > before.split_point and after.recompute
        assert after.predicted_bytes <= after.budget_bytes
        assert after.predicted_bytes == memory.client_bytes(after.split_point, after.ranks, recompute=True)
        assert sum(after.ranks.values()) > 0
    assert auto.to_dict()["clients"][0]["recompute"] is True


def test_the_time_model_counts_the_front_s_forward_again(tokenizer):
    memory = memory_of(tokenizer)
    ranks = {n: 4 for n in memory.candidates}
    client_side = {n: r for n, r in ranks.items() if memory.candidates[n].block < 3}
    kept = ClientPlan(0, 10**9, 3, client_side, 0)
    recomputed = ClientPlan(0, 10**9, 3, client_side, 0, recompute=True)
    block_params = memory.block_bytes / memory.dtype_bytes
    extra = client_flops_per_token(memory, recomputed, 100, 64) - client_flops_per_token(memory, kept, 100, 64)
    assert extra == pytest.approx(2 * 3 * block_params + 2 * adapter_params(memory, client_side))


def test_recompute_is_refused_where_it_would_do_nothing_or_break_dp_sgd():
    with pytest.raises(UsageError, match=r"^recompute 'sometimes' is unknown; choose off or on or auto\.$"):
        check(RunConfig(model="tiny", recompute="sometimes"))
    with pytest.raises(UsageError, match=r"^recompute on recomputes a split client's blocks .* hetlora runs the model"):
        check(RunConfig(model="tiny", recompute="on", strategy="hetlora"))
    with pytest.raises(UsageError, match=r"^recompute auto runs the client's blocks twice, and DP-SGD"):
        check(RunConfig(model="tiny", recompute="auto", dp_sgd_sigma=1.0))


def test_plan_marks_the_clients_that_recompute_and_names_recomputation_when_none_fits(capsys):
    from .test_settings import one_sentence, run_cli

    args = ("plan", "--model", "tiny", "--uniform-importance", "--split-rule", "deepest")
    assert run_cli(*args, "--budgets", "5MB,10MB", "--recompute", "auto") == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if "MB │" in line]
    assert "(recomputed)" not in rows[0] and "(recomputed)" in rows[1]  # client 1's budget holds a cut only so
    assert run_cli(*args, "--budgets", "1MB", "--recompute", "on") == 2
    one_sentence(capsys.readouterr().err, "client 0 cannot take part", "recomputing the blocks' activations")
