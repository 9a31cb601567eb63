"""SplitLoRA: one cut and one rank for every client (the deepest and largest the weakest budget
admits), FedAvg of A and B separately every round; adapters and their optimizer state persist."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.method.aggregation import FEDAVG
from hsplitlora.method.planner import Plan
from hsplitlora.strategies.base import Strategy


class SplitLoRA(Strategy):
    name = "splitlora"
    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.splitlora_plan()
