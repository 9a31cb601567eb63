"""ARMSC under client sampling (method.md sections 4, 5 and 7): when m of K clients train each
round, the main server's budget is shared by m (M_S / m each) and its expected busy time is m / K
of the busy time over all K; the slowest client still bounds the round. Without sampling the plan
and the predicted time are unchanged."""

from __future__ import annotations

import json

import pytest

from hsplitlora.devices import DeviceProfile
from hsplitlora.strategies import STRATEGIES, StrategyContext
from hsplitlora.strategies.base import Strategy
from hsplitlora.time_model import Workload
from tests.test_planner import MEMORY, NAMES

UNIFORM = dict.fromkeys(NAMES, 1.0)


def strategy_for(devices: list[tuple[int, float, float]], clients_per_round: int | None, server_flops: float = 2e13,
                 server_budget: int = 20_000_000, name: str = "hsplitlora") -> Strategy:  # fmt: skip
    workload = Workload(steps=10, tokens_per_step=40.0, padded_tokens_per_step=64.0, hidden_size=64,
                        vocab_size=256, server_flops=server_flops)  # fmt: skip
    profiles = [DeviceProfile(budget, flops, bandwidth) for budget, flops, bandwidth in devices]
    context = StrategyContext(MEMORY, profiles, server_budget, (0, 2, 4, 8, 16), 0.25, 1, 0.1, split_rule="fastest",
                              workload=workload, clients_per_round=clients_per_round)  # fmt: skip
    return STRATEGIES[name](context)


def test_the_expected_server_busy_time_scales_with_the_sampled_share():
    strong = [(3_000_000, 1e13, 1e12)] * 4  # devices far faster than a 1 GFLOP/s server: it bounds the round
    everyone, half = strategy_for(strong, None, server_flops=1e9), strategy_for(strong, 2, server_flops=1e9)
    clients = everyone.uniform_plan(1, 4).clients
    assert half.round_time(clients) == pytest.approx(everyone.round_time(clients) * 2 / 4, rel=1e-12)


def test_the_slowest_client_still_bounds_the_round_under_sampling():
    slow = [(3_000_000, 1e9, 1e6)] + [(3_000_000, 1e12, 1e10)] * 3  # one slow device, a fast server
    everyone, one = strategy_for(slow, None), strategy_for(slow, 1)
    clients = everyone.uniform_plan(1, 4).clients
    # Any client may be drawn: the plan is timed by the slowest path, not by an expected maximum over m.
    assert one.round_time(clients) == everyone.round_time(clients)


def test_each_sampled_client_gets_the_server_budget_over_m():
    devices = [(3_000_000, 1e9, 1e8)] * 4
    everyone = strategy_for(devices, None, server_budget=4_000_000)
    two = strategy_for(devices, 2, server_budget=4_000_000)
    assert (everyone.server_share, two.server_share) == (1_000_000, 2_000_000)
    planned = two.armsc(UNIFORM)
    assert planned.to_dict()["server"]["budget_per_client_bytes"] == 2_000_000
    assert all(c.server_predicted_bytes <= 2_000_000 for c in planned.clients)
    # The larger share holds more server-side rank at the same cut.
    fixed = [c.split_point for c in planned.clients]
    narrow = everyone.armsc(UNIFORM, fixed)
    assert sum(sum(c.server_ranks.values()) for c in planned.clients) > sum(
        sum(c.server_ranks.values()) for c in narrow.clients
    )


def test_a_shallower_cut_becomes_feasible_and_chosen_when_fewer_clients_share_the_server():
    # Slow devices want the shallowest cut; at M_S / 4 = 0.8 MB the server holds the activations of
    # cuts 3 and deeper only, at M_S / 2 = 1.6 MB it holds cut 1's (1.05 MB).
    devices = [(3_000_000, 1e9, 1e8)] * 4
    everyone = strategy_for(devices, None, server_budget=3_200_000)
    two = strategy_for(devices, 2, server_budget=3_200_000)
    assert MEMORY.server_bytes(2) > everyone.server_share >= MEMORY.server_bytes(3)
    assert two.server_share >= MEMORY.server_bytes(1)
    assert min(c.split_point for c in everyone.armsc(UNIFORM).clients) >= 3
    assert max(c.split_point for c in two.armsc(UNIFORM).clients) == 1
    # The best uniform SplitLoRA sees the same share: cut 1 is open to it only under sampling.
    assert min(everyone.uniform_ranks()) >= 3 and min(two.uniform_ranks()) == 1


def test_sampling_every_client_plans_exactly_as_no_sampling():
    devices = [(1_000_000 + 500_000 * i, 10.0 ** (9 + i), 10.0 ** (6 + i)) for i in range(4)]
    for name in ("hsplitlora", "splitlora", "no-iwi"):
        default, all_four = strategy_for(devices, None, name=name), strategy_for(devices, 4, name=name)
        first, second = default.make_plan(UNIFORM), all_four.make_plan(UNIFORM)
        assert [c.all_ranks() for c in first.clients] == [c.all_ranks() for c in second.clients]
        assert [c.split_point for c in first.clients] == [c.split_point for c in second.clients]
        assert default.round_time(first.clients) == all_four.round_time(second.clients)


def test_plan_takes_clients_per_round_and_gives_each_sampled_client_its_share(capsys):
    from .test_settings import run_cli

    common = ("plan", "--model", "tiny", "--budgets", "5MB,8MB,20MB,20MB", "--server-budget", "8MB",
              "--uniform-importance", "--json")  # fmt: skip
    assert run_cli(*common) == 0
    everyone = json.loads(capsys.readouterr().out)
    assert run_cli(*common, "--clients-per-round", "1") == 0
    one = json.loads(capsys.readouterr().out)
    # M_S / 4 = 2 MB a client holds no server-side adapter; M_S / 1 = 8 MB for the one sampled holds some.
    assert everyone["server"]["budget_per_client_bytes"] == 2_000_000
    assert one["server"]["budget_per_client_bytes"] == 8_000_000

    def server_ranks(plan: dict) -> int:
        return sum(sum(c["ranks"].values()) for c in plan["server"]["clients"])

    assert server_ranks(one) > server_ranks(everyone)
    assert run_cli(*common[:-1], "--clients-per-round", "2") == 0
    assert "per client, 2 of 4 a round" in capsys.readouterr().out
