"""SplitLoRA: one cut and one rank for every client (the deepest and largest the weakest budget
admits), FedAvg of A and B separately every round; adapters persist."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.method.planner import Plan
from hsplitlora.strategies.base import Strategy


class SplitLoRA(Strategy):
    name = "splitlora"
    aggregator = "fedavg"
    persistent_adapters = True
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        split_point, rank = self.weakest_split_and_rank()
        count = len(self.context.devices)
        return self.fixed_plan([split_point] * count, [rank] * count)
