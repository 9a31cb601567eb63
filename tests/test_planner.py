"""ARMSC: the plan never exceeds a budget, deeper cuts and more rank for larger budgets, rank
follows importance, ranks stay in Q, and the greedy stops only when nothing more fits."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsplitlora.errors import UsageError
from hsplitlora.method.memory import CandidateShape, MemoryModel
from hsplitlora.method.planner import DEFAULT_LEVELS, InfeasibleClientError, allocate_ranks, plan
from hsplitlora.units import parse_budgets, parse_bytes

NUM_BLOCKS = 6
KINDS = {"q": (64, 64), "k": (64, 32), "v": (64, 32), "o": (64, 64)}


def memory_model() -> MemoryModel:
    candidates = {
        f"layers.{b}.{kind}": CandidateShape(b, d_in, d_out)
        for b in range(NUM_BLOCKS)
        for kind, (d_in, d_out) in KINDS.items()
    }
    return MemoryModel(
        num_blocks=NUM_BLOCKS, dtype_bytes=4, embedding_bytes=400_000, block_bytes=200_000, head_bytes=400_000,
        block_activation_bytes=150_000, head_activation_bytes=300_000, batch_size=4, seq_len=16,
        candidates=candidates,
    )  # fmt: skip


MEMORY = memory_model()
NAMES = list(MEMORY.candidates)
budgets_st = st.integers(min_value=1_000_000, max_value=4_000_000)  # the shallowest cut needs 0.98 MB
importance_st = st.lists(
    st.floats(min_value=1e-6, max_value=1.0, allow_nan=False), min_size=len(NAMES), max_size=len(NAMES)
).map(lambda values: dict(zip(NAMES, values, strict=True)))


def next_level(rank: int) -> int | None:
    i = DEFAULT_LEVELS.index(rank)
    return DEFAULT_LEVELS[i + 1] if i + 1 < len(DEFAULT_LEVELS) else None


@settings(max_examples=200, deadline=None)
@given(budgets=st.lists(budgets_st, min_size=1, max_size=5), importance=importance_st)
def test_no_plan_exceeds_any_budget_and_ranks_stay_in_q(budgets, importance):
    result = plan(importance, budgets, MEMORY, server_budget_bytes=20_000_000, leave_out_infeasible=True)
    for client in result.clients:
        assert client.predicted_bytes <= client.budget_bytes
        assert MEMORY.client_bytes(client.split_point) <= 0.75 * client.budget_bytes
        assert all(rank in DEFAULT_LEVELS for rank in client.all_ranks().values())
        assert set(client.ranks) == set(MEMORY.client_side(client.split_point))
        assert client.server_predicted_bytes <= 20_000_000 // len(budgets)


def adapter_bytes(client) -> int:
    return sum(MEMORY.adapter_bytes(name, rank) for name, rank in client.ranks.items())


@settings(max_examples=300, deadline=None)
@given(small=budgets_st, extra=st.integers(min_value=0, max_value=2_000_000), importance=importance_st)
def test_larger_budget_never_shallower_nor_less_adapter_memory_at_the_same_cut(small, extra, importance):
    low = plan(importance, [small], MEMORY, 20_000_000).clients[0]
    high = plan(importance, [small + extra], MEMORY, 20_000_000).clients[0]
    assert high.split_point >= low.split_point
    if high.split_point == low.split_point:
        # Provable for the greedy: the larger budget follows the same upgrade order and takes every
        # upgrade the smaller one took up to the first the smaller one could not afford, which
        # costs more than all the smaller budget spent after it.
        assert adapter_bytes(high) >= adapter_bytes(low)


def test_total_rank_is_not_monotone_in_the_budget_when_rank_costs_differ():
    """The counterexample hypothesis found for "never a smaller total rank": with budget 2,928,240 one
    q/o matrix reaches rank 16; 5,632 bytes more let a k/v matrix (cheaper per rank) start first,
    and the rest then only buys 8 + 2. Both plans are maximal; the larger spends more bytes."""
    importance = dict(zip(NAMES, [1.0] * 15 + [0.5] * 5 + [1.0] * 4, strict=True))
    low = plan(importance, [2_928_240], MEMORY, 20_000_000).clients[0]
    high = plan(importance, [2_928_240 + 5_632], MEMORY, 20_000_000).clients[0]
    assert low.split_point == high.split_point
    assert sum(high.ranks.values()) < sum(low.ranks.values())
    assert adapter_bytes(high) > adapter_bytes(low)


@settings(max_examples=200, deadline=None)
@given(budget=budgets_st, importance=importance_st)
def test_more_important_matrix_of_equal_cost_never_gets_a_lower_rank(budget, importance):
    result = plan(importance, [budget], MEMORY, 20_000_000, leave_out_infeasible=True)
    for client in result.clients:
        for a in client.ranks:
            for b in client.ranks:
                same_cost = MEMORY.candidates[a].d_out == MEMORY.candidates[b].d_out
                if same_cost and importance[a] > importance[b]:
                    assert client.ranks[a] >= client.ranks[b], (a, b)


@settings(max_examples=200, deadline=None)
@given(budget=budgets_st, importance=importance_st)
def test_greedy_stops_only_when_no_further_upgrade_fits(budget, importance):
    result = plan(importance, [budget], MEMORY, 20_000_000, leave_out_infeasible=True)
    for client in result.clients:
        left = client.budget_bytes - client.predicted_bytes
        for name, rank in client.ranks.items():
            nxt = next_level(rank)
            if nxt is not None:
                assert MEMORY.adapter_bytes(name, nxt) - MEMORY.adapter_bytes(name, rank) > left


def test_greedy_prefers_importance_per_byte():
    cost = {"cheap": 1, "dear": 4}
    ranks = allocate_ranks(
        ["cheap", "dear"], {"cheap": 1.0, "dear": 1.0}, lambda name, r: cost[name] * r, available_bytes=8
    )
    assert ranks == {"cheap": 8, "dear": 0}


def test_weaker_devices_get_shallower_cuts():
    result = plan(dict.fromkeys(NAMES, 1.0), [1_100_000, 1_500_000, 3_000_000], MEMORY, 20_000_000)
    cuts = [c.split_point for c in result.clients]
    assert cuts == sorted(cuts) and cuts[0] < cuts[-1]


def test_budget_below_the_shallowest_cut_names_the_client_and_the_missing_bytes():
    need = MEMORY.client_bytes(1) / 0.75
    with pytest.raises(InfeasibleClientError, match=r"client 1 cannot take part: its budget of .* lacks"):
        plan(dict.fromkeys(NAMES, 1.0), [2_000_000, int(need) - 1000], MEMORY, 20_000_000)
    with pytest.warns(UserWarning, match="client 1 cannot take part"):
        result = plan(dict.fromkeys(NAMES, 1.0), [2_000_000, 1000], MEMORY, 20_000_000, leave_out_infeasible=True)
    assert result.left_out == [1] and [c.client for c in result.clients] == [0]


@pytest.mark.parametrize("text, value", [("800MB", 800_000_000), ("1.5GB", 1_500_000_000), ("2GiB", 2 * 2**30),
                                         ("123456", 123456), ("64 KiB", 65536)])  # fmt: skip
def test_budget_strings(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1GB", "1.5XB", "0", "nanGB", "1,,"])
def test_bad_budget_strings_are_refused(text):
    with pytest.raises(UsageError, match="budget"):
        parse_budgets(text) if "," in text or not text else parse_bytes(text)


def test_splitlora_moves_its_cut_up_until_the_weakest_budget_holds_a_positive_uniform_rank():
    from hsplitlora.devices import DeviceProfile
    from hsplitlora.method.planner import choose_split_point
    from hsplitlora.strategies import STRATEGIES, StrategyContext

    memory = MEMORY
    deepest = choose_split_point(memory, 2_000_000, 0.0, 1)
    # A budget that fits the deepest cut with almost nothing left for adapters there.
    budget = memory.client_bytes(deepest) + 1
    context = StrategyContext(memory, [DeviceProfile(budget, 1e9, 1e6)] * 2, 16 * 10**9, (0, 2, 4, 8), 0.0, 1, 0.1)
    plan = STRATEGIES["splitlora-paper"](context).plan(None)
    cut = plan.clients[0].split_point
    rank = set(plan.clients[0].ranks.values())
    assert cut < deepest and len(rank) == 1 and rank.pop() > 0
    assert plan.clients[0].predicted_bytes <= budget


# -- the time-aware cut (split_rule fastest) ------------------------------------------------------
devices_st = st.lists(st.tuples(budgets_st, st.floats(1e8, 1e13), st.floats(1e5, 1e9)), min_size=1, max_size=5)


def strategy_for(devices, rule: str, name: str = "hsplitlora", server_flops: float = 2e13, server_budget=20_000_000):
    from hsplitlora.devices import DeviceProfile
    from hsplitlora.strategies import STRATEGIES, StrategyContext
    from hsplitlora.time_model import Workload

    workload = Workload(steps=10, tokens_per_step=40.0, padded_tokens_per_step=64.0, hidden_size=64,
                        vocab_size=256, server_flops=server_flops)  # fmt: skip
    profiles = [DeviceProfile(budget, flops, bandwidth) for budget, flops, bandwidth in devices]
    context = StrategyContext(MEMORY, profiles, server_budget, DEFAULT_LEVELS, 0.25, 1, 0.1, split_rule=rule,
                              workload=workload)  # fmt: skip
    return STRATEGIES[name](context)


@settings(max_examples=80, deadline=None)
@given(devices=devices_st, server_flops=st.floats(1e9, 1e14))
def test_the_time_aware_plan_is_never_slower_than_the_deepest_fit_or_splitlora_plan(devices, server_flops):
    fastest = strategy_for(devices, "fastest", server_flops=server_flops)
    deepest = strategy_for(devices, "deepest", server_flops=server_flops)
    uniform = dict.fromkeys(NAMES, 1.0)
    try:
        chosen = fastest.armsc(uniform)
    except InfeasibleClientError:
        return
    assert fastest.round_time(chosen.clients) <= fastest.round_time(deepest.armsc(uniform).clients) * (1 + 1e-9)
    share = 20_000_000 // len(devices)
    try:
        uniform_plan = fastest.splitlora_plan()
    except UsageError:
        uniform_plan = None
    # The paper's plan is a candidate of the best uniform one wherever it fits the server's share too.
    if uniform_plan is not None and all(c.server_predicted_bytes <= share for c in uniform_plan.clients):
        assert fastest.round_time(chosen.clients) <= fastest.round_time(uniform_plan.clients) * (1 + 1e-9)
    try:
        best_uniform = fastest.best_uniform_plan()
    except UsageError:
        best_uniform = None
    if best_uniform is not None:
        assert fastest.round_time(chosen.clients) <= fastest.round_time(best_uniform.clients) * (1 + 1e-9)
    for client in chosen.clients:
        assert client.predicted_bytes <= client.budget_bytes
        assert client.server_predicted_bytes <= share


def test_slow_devices_get_shallow_cuts_and_a_slow_server_pushes_strong_devices_deeper():
    budgets = [3_000_000] * 3
    slow = [(b, 1e9, 1e8) for b in budgets]  # devices far slower than the 20 TFLOP/s server
    cuts = [c.split_point for c in strategy_for(slow, "fastest").armsc(dict.fromkeys(NAMES, 1.0)).clients]
    deepest = [c.split_point for c in strategy_for(slow, "deepest").armsc(dict.fromkeys(NAMES, 1.0)).clients]
    assert max(cuts) < min(deepest)
    strong = [(b, 1e13, 1e12) for b in budgets]  # devices faster than a server that serves all three
    cuts = [c.split_point for c in strategy_for(strong, "fastest", server_flops=1e11).armsc(
        dict.fromkeys(NAMES, 1.0)).clients]  # fmt: skip
    assert max(cuts) > 1


def test_replans_keep_the_cuts_and_move_only_ranks():
    # A main server whose per-client share holds only some of the server-side ranks: importance decides.
    strategy = strategy_for([(1_000_000, 1e9, 1e7), (1_010_000, 1e10, 1e8)], "fastest", server_budget=4_000_000)
    first = strategy.make_plan(dict.fromkeys(NAMES, 1.0))
    skewed = {name: (1.0 if name.endswith(".q") else 1e-3) for name in NAMES}
    second = strategy.make_plan(skewed)
    assert [c.split_point for c in first.clients] == [c.split_point for c in second.clients]
    assert [c.all_ranks() for c in first.clients] != [c.all_ranks() for c in second.clients]


# -- the best uniform SplitLoRA (method.md section 7, revised) --------------------------------------
def uniform_fits(strategy, split_point: int, rank: int) -> bool:
    """Whether one cut and one rank for all fit ARMSC's cut rule and every budget, client and server."""
    c, memory = strategy.context, strategy.context.memory
    share = c.server_budget // len(c.devices)
    plan = strategy.uniform_plan(split_point, rank)
    return (
        memory.server_bytes(split_point) <= share
        and all(memory.client_bytes(split_point) <= (1 - c.rho) * p.budget_bytes for p in plan.clients)
        and all(p.predicted_bytes <= p.budget_bytes and p.server_predicted_bytes <= share for p in plan.clients)
    )


@settings(max_examples=60, deadline=None)
@given(devices=devices_st, server_flops=st.floats(1e9, 1e14), server_budget=st.integers(2_000_000, 30_000_000))
def test_the_best_uniform_plan_fits_every_budget_and_no_other_full_uniform_plan_is_predicted_faster(
    devices, server_flops, server_budget
):
    strategy = strategy_for(devices, "fastest", name="splitlora", server_flops=server_flops,
                            server_budget=server_budget)  # fmt: skip
    fitting = [(s, r) for s in range(1, NUM_BLOCKS) for r in DEFAULT_LEVELS if r > 0 and uniform_fits(strategy, s, r)]
    if not fitting:
        with pytest.raises(UsageError, match="no single cut"):
            strategy.plan(None)
        return
    chosen = strategy.plan(None)
    cut, rank = chosen.clients[0].split_point, chosen.clients[0].ranks[NAMES[0]]
    assert {c.split_point for c in chosen.clients} == {cut}
    assert {r for c in chosen.clients for r in c.all_ranks().values()} == {rank}
    assert uniform_fits(strategy, cut, rank)
    # Each cut at the largest rank every budget holds there (as ARMSC fills the budget).
    largest = {s: max(r for t, r in fitting if t == s) for s, _ in fitting}
    assert rank == largest[cut]
    seconds = strategy.round_time(chosen.clients)
    for other_cut, other_rank in largest.items():
        other = strategy.round_time(strategy.uniform_plan(other_cut, other_rank).clients)
        assert seconds <= other * (1 + 1e-9)
        if other <= seconds * (1 + 1e-9):  # a tie: the larger rank, then the shallower cut
            assert (rank, -cut) >= (other_rank, -other_cut)


def test_a_slow_link_moves_the_best_uniform_cut_and_the_paper_rule_keeps_the_weakest_deepest_cut():
    # Slow devices on fast links: the best uniform cut is shallow; the paper's is the deepest fit.
    devices = [(1_500_000, 1e8, 1e9), (3_000_000, 1e8, 1e9)]
    best = strategy_for(devices, "fastest", name="splitlora").plan(None)
    paper = strategy_for(devices, "fastest", name="splitlora-paper")
    split_point, rank = paper.weakest_split_and_rank()
    assert [c.split_point for c in paper.plan(None).clients] == [split_point] * 2
    assert {r for c in paper.plan(None).clients for r in c.all_ranks().values()} == {rank}
    assert best.clients[0].split_point < split_point
    assert paper.round_time(best.clients) < paper.round_time(paper.plan(None).clients)


def test_no_armsc_runs_the_best_uniform_plan_with_naa_memory():
    devices = [(1_500_000, 1e9, 1e7), (3_000_000, 1e10, 1e8)]
    no_armsc = strategy_for(devices, "fastest", name="no-armsc")
    plan = no_armsc.plan(None)
    split_point, rank = no_armsc.best_uniform_split_and_rank()
    assert [c.split_point for c in plan.clients] == [split_point] * 2
    assert {r for c in plan.clients for r in c.all_ranks().values()} == {rank}
    assert rank == no_armsc.uniform_ranks()[split_point]  # the largest that fits with the anchors counted
    assert all(c.predicted_bytes <= c.budget_bytes for c in plan.clients)


# -- ranks that cost time (rank_time_slack) -------------------------------------------------------
def timed_strategy(devices, slack, name="hsplitlora", server_flops=1e9, server_budget=20_000_000):
    import dataclasses

    strategy = strategy_for(devices, "fastest", name=name, server_flops=server_flops, server_budget=server_budget)
    return type(strategy)(dataclasses.replace(strategy.context, rank_time_slack=slack))


def reference_time(strategy, clients) -> float:
    """The same cuts with every rank at the smallest positive level (where memory allows it)."""
    from hsplitlora.method.planner import _client_plan

    c = strategy.context
    share = strategy.server_share
    floor = min(q for q in c.levels if q > 0)
    at_floor = [_client_plan(p.client, p.budget_bytes, p.split_point, dict.fromkeys(NAMES, 1.0), c.memory, share,
                             c.levels, (floor, floor), c.rho) for p in clients]  # fmt: skip
    return strategy.round_time(at_floor)


@settings(max_examples=40, deadline=None)
@given(devices=devices_st, server_flops=st.floats(1e8, 1e12), slack=st.sampled_from([0.0, 0.02, 0.1, 0.5]))
def test_timed_ranks_keep_the_round_within_the_slack_and_every_budget(devices, server_flops, slack):
    free = strategy_for(devices, "fastest", server_flops=server_flops)
    timed = timed_strategy(devices, slack, server_flops=server_flops)
    uniform = dict.fromkeys(NAMES, 1.0)
    try:
        untimed_plan = free.armsc(uniform)
    except UsageError:
        return
    plan_ = timed.armsc(uniform)
    share = timed.server_share
    for client in plan_.clients:
        assert client.predicted_bytes <= client.budget_bytes
        assert client.server_predicted_bytes <= share
        assert set(client.all_ranks().values()) <= set(DEFAULT_LEVELS)
    seconds = timed.round_time(plan_.clients)
    one_cut_one_rank = (
        len({c.split_point for c in plan_.clients}) == 1
        and len({r for c in plan_.clients for r in c.all_ranks().values()}) == 1
    )
    if not one_cut_one_rank:  # ARMSC's own plan (not the best uniform alternative, which fits its own rank)
        assert seconds <= (1 + slack) * reference_time(timed, plan_.clients) * (1 + 1e-9)
    # Never slower than the same planner without the time rule.
    assert seconds <= free.round_time(untimed_plan.clients) * (1 + 1e-9)


def test_timed_ranks_come_down_only_where_they_hold_the_round_up():
    # A server ten times slower than it needs to be: the server-side ranks cost the round, the
    # clients' (fast links, fast devices) do not.
    devices = [(3_000_000, 1e13, 1e10), (3_000_000, 1e13, 1e10)]
    uniform = dict.fromkeys(NAMES, 1.0)
    free = strategy_for(devices, "fastest", server_flops=1e8).armsc(uniform, split_points=[2, 2])
    timed_strategy_ = timed_strategy(devices, 0.0, server_flops=1e8)
    timed = timed_strategy_.armsc(uniform, split_points=[2, 2])
    assert [c.ranks for c in timed.clients] == [c.ranks for c in free.clients]  # client sides untouched
    assert sum(sum(c.server_ranks.values()) for c in timed.clients) < sum(
        sum(c.server_ranks.values()) for c in free.clients
    )
    assert max(max(c.server_ranks.values()) for c in timed.clients) >= 2  # never below the smallest level
    assert timed_strategy_.round_time(timed.clients) < timed_strategy_.round_time(free.clients)


def test_timed_uniform_rank_is_the_largest_within_the_slack():
    devices = [(3_000_000, 1e9, 1e5), (3_000_000, 1e9, 1e5)]  # slow links: every rank costs time
    strategy = timed_strategy(devices, 0.05, name="splitlora")
    cut, rank = strategy.best_uniform_split_and_rank()
    bound = 1.05 * strategy.round_time(strategy.uniform_plan(cut, 2).clients)
    assert strategy.round_time(strategy.uniform_plan(cut, rank).clients) <= bound * (1 + 1e-9)
    larger = [q for q in DEFAULT_LEVELS if q > rank and q <= strategy.uniform_ranks()[cut]]
    for level in larger:
        assert strategy.round_time(strategy.uniform_plan(cut, level).clients) > bound


def test_rank_time_slack_is_refused_where_nothing_would_follow_it():
    from hsplitlora.checks import check
    from hsplitlora.config import RunConfig

    with pytest.raises(UsageError, match="rank_time_slack 0.05 lets the time model lower ranks, and splitlora-paper"):
        check(RunConfig(strategy="splitlora-paper", rank_time_slack=0.05, model="tiny"))
    with pytest.raises(UsageError, match="rank fixes the plan"):
        check(RunConfig(rank=4, rank_time_slack=0.05, model="tiny"))
    with pytest.raises(UsageError, match="rank_time_slack is the share ranks may add"):
        check(RunConfig(rank_time_slack=-0.1, model="tiny"))


def test_a_client_that_does_not_bound_the_round_still_moves_where_it_relieves_the_server():
    from hsplitlora.method.planner import ClientPlan, fastest_split_points

    # Client 0 bounds every round (10 s); client 1's path grows with its cut, the server's shrinks.
    def plan_at(position: int, split_point: int) -> ClientPlan:
        return ClientPlan(position, 0, split_point, {}, 0)

    def times(plans: list[ClientPlan]) -> list[float]:
        return [10.0, float(plans[1].split_point), 9.0 - plans[1].split_point]

    options = [[1], [1, 2, 3, 4, 5]]
    assert fastest_split_points(options, plan_at, lambda p: max(times(p))) == [1, 1]  # the round alone: no move
    assert fastest_split_points(options, plan_at, lambda p: max(times(p)), round_times=times) == [1, 4]


def test_the_time_model_counts_each_client_s_own_tokens():
    from hsplitlora.time_model import Workload

    devices = [(3_000_000, 1e9, 1e6), (3_000_000, 1e9, 1e6)]
    strategy = strategy_for(devices, "fastest")
    plan_ = strategy.fixed_plan([2, 2], [4, 4])
    pooled = strategy.round_times(plan_.clients)
    assert pooled[0] == pytest.approx(pooled[1])
    strategy.context.workload = Workload(steps=10, tokens_per_step=40.0, padded_tokens_per_step=64.0, hidden_size=64,
                                         vocab_size=256, server_flops=2e13,
                                         per_client=((40.0, 64.0), (80.0, 128.0)))  # fmt: skip
    apart = strategy.round_times(plan_.clients)
    assert apart[0] == pytest.approx(pooled[0]) and apart[1] > 1.9 * pooled[1]
