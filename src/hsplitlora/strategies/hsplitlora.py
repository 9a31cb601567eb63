"""HSplitLoRA (method.md sections 3-6) and its ablations."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.method.planner import ClientPlan, Plan
from hsplitlora.strategies.base import Strategy


class HSplitLoRA(Strategy):
    """IWI importance -> ARMSC cuts and ranks -> NAA stacked aggregation, merged every round."""

    name = "hsplitlora"
    aggregator = "naa"

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        c = self.context
        if c.fixed_split_points is not None and c.fixed_ranks is not None:
            return self.fixed_plan(c.fixed_split_points, c.fixed_ranks)
        return self.armsc(importance or dict.fromkeys(c.memory.candidates, 1.0))


class NoIWI(HSplitLoRA):
    """ARMSC's cuts, but uniform ranks (the largest level that fits) instead of importance-driven."""

    name = "no-iwi"
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        base = self.armsc(dict.fromkeys(self.context.memory.candidates, 1.0))
        memory = self.context.memory
        clients = []
        for client in base.clients:
            rank = self.largest_uniform_rank(client.split_point, client.budget_bytes)
            server_rank = self.largest_uniform_rank(client.split_point, client.budget_bytes, server_side=True)
            ranks = dict.fromkeys(client.ranks, rank)
            server_ranks = dict.fromkeys(client.server_ranks, server_rank)
            clients.append(ClientPlan(
                client.client, client.budget_bytes, client.split_point, ranks,
                memory.client_bytes(client.split_point, ranks), server_ranks,
                memory.server_bytes(client.split_point, server_ranks),
            ))  # fmt: skip
        return Plan(clients, base.server_budget_bytes, base.server_frozen_bytes, base.levels,
                    tail_blocks=base.tail_blocks)  # fmt: skip


class NoARMSC(HSplitLoRA):
    """SplitLoRA's fixed cut and rank for everyone, keeping NAA."""

    name = "no-armsc"
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        split_point, rank = self.weakest_split_and_rank()
        count = len(self.context.devices)
        return self.fixed_plan([split_point] * count, [rank] * count)


class NoNAA(HSplitLoRA):
    """HSplitLoRA with zero-padded averaging of the factors instead of NAA (cross terms merged)."""

    name = "no-naa"
    aggregator = "zero-pad"
