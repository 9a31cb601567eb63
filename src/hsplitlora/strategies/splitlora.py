"""SplitLoRA: one cut and one rank for every client, FedAvg of A and B separately every round;
adapters and their optimizer state persist. `splitlora` takes the best uniform configuration the
time model and budgets allow (method.md section 7, revised); `splitlora-paper` the paper's rule."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.method.aggregation import FEDAVG
from hsplitlora.method.planner import Plan
from hsplitlora.strategies.base import Strategy


class SplitLoRA(Strategy):
    """The best uniform SplitLoRA: at every cut that every client's budget and the server's share
    allow, the largest rank that fits everywhere; of those, the cut with the least predicted round
    time (ties: the larger rank, then the shallower cut)."""

    name = "splitlora"
    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.best_uniform_plan()


class SplitLoRAPaper(SplitLoRA):
    """The paper's SplitLoRA: the deepest cut and largest uniform rank the weakest budget admits."""

    name = "splitlora-paper"

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.splitlora_plan()
