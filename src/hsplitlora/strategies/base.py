"""The strategy interface: how a method plans each round (cuts and ranks) and how the fed server
aggregates. Every baseline and ablation is a subclass, like Flower's strategies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hsplitlora.devices import DeviceProfile
from hsplitlora.errors import UsageError
from hsplitlora.method.importance import should_replan
from hsplitlora.method.memory import MemoryModel
from hsplitlora.method.planner import ClientPlan, Plan, choose_split_point, format_bytes, plan


@dataclass
class StrategyContext:
    memory: MemoryModel
    devices: list[DeviceProfile]
    server_budget: int
    levels: tuple[int, ...]
    rho: float
    s_min: int
    replan_delta: float
    fixed_split_points: list[int] | None = None
    fixed_ranks: list[int] | None = None


class Strategy:
    name: str = ""
    aggregator: str = "naa"  # see FedServer: naa | zero-pad | fedavg | zero-pad-truncate
    persistent_adapters: bool = False  # adapters kept across rounds instead of merged
    uses_importance: bool = True
    centralised: bool = False  # one trainer on the pooled data (upper references)
    full_finetune: bool = False  # every weight trained, no adapters
    splits: bool = True  # cuts the model between client and main server (False: every client runs it whole)

    def __init__(self, context: StrategyContext):
        self.context = context
        self.importance_at_last_plan: dict[str, float] | None = None

    @property
    def budgets(self) -> list[int]:
        return [d.budget_bytes for d in self.context.devices]

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        raise NotImplementedError

    def wants_replan(self, round_: int, importance: Mapping[str, float] | None) -> bool:
        """Plan at round 1; later only when the importance ranking moved beyond delta."""
        if self.importance_at_last_plan is None:
            return True
        if not self.uses_importance or importance is None:
            return False
        return should_replan(importance, self.importance_at_last_plan, self.context.replan_delta)

    def make_plan(self, importance: Mapping[str, float] | None) -> Plan:
        result = self.plan(importance)
        self.importance_at_last_plan = dict(importance or {})
        return result

    # -- helpers shared by subclasses -----------------------------------------------------------
    def fixed_plan(self, split_points: list[int], ranks: list[int]) -> Plan:
        """Every candidate of every client (and of the server for it) at one rank per client."""
        memory = self.context.memory
        clients = []
        for cid, (split_point, rank) in enumerate(zip(split_points, ranks, strict=True)):
            client_ranks = dict.fromkeys(memory.client_side(split_point), rank)
            server_ranks = dict.fromkeys(memory.server_side(split_point), rank)
            clients.append(ClientPlan(
                cid, self.budgets[cid], split_point, client_ranks, memory.client_bytes(split_point, client_ranks),
                server_ranks, memory.server_bytes(split_point, server_ranks),
            ))  # fmt: skip
        shallowest = min(split_points)
        return Plan(clients, self.context.server_budget, memory.server_frozen_bytes(shallowest), self.context.levels,
                    tail_blocks=memory.tail_blocks)  # fmt: skip

    def unsplit_plan(self, ranks: list[int]) -> Plan:
        """Every client runs the whole model (split point L) with one rank on every candidate;
        its memory is reported, not limited by its budget (method.md section 7)."""
        memory = self.context.memory
        clients = []
        for cid, rank in enumerate(ranks):
            client_ranks = dict.fromkeys(memory.candidates, rank)
            clients.append(ClientPlan(
                cid, self.budgets[cid] if cid < len(self.budgets) else 0, memory.num_blocks, client_ranks,
                memory.unsplit_bytes(client_ranks, self.full_finetune), {}, 0,
            ))  # fmt: skip
        return Plan(clients, self.context.server_budget, 0, self.context.levels)

    def largest_uniform_rank(self, split_point: int, budget: int, server_side: bool = False) -> int:
        memory = self.context.memory
        best = 0
        for level in sorted(self.context.levels):
            if server_side:
                share = self.context.server_budget // len(self.context.devices)
                fits = memory.server_bytes(split_point, dict.fromkeys(memory.server_side(split_point), level)) <= share
            else:
                fits = memory.client_bytes(split_point, dict.fromkeys(memory.client_side(split_point), level)) <= budget
            if fits:
                best = level
        return best

    def weakest_split_and_rank(self) -> tuple[int, int]:
        """SplitLoRA's configuration: the deepest cut at which the weakest budget holds adapters of
        one positive rank on all its candidates, and the largest such rank. (The deepest cut that
        merely fits, ARMSC's first step, can leave no room for even the smallest uniform rank:
        every adapter also keeps its input for backward, whatever its rank.)"""
        weakest = min(self.budgets)
        deepest = choose_split_point(self.context.memory, weakest, self.context.rho, self.context.s_min)
        if deepest is None:
            raise UsageError(
                f"the weakest client's budget of {format_bytes(weakest)} cannot hold even {self.context.s_min} "
                "block(s); give larger budgets."
            )
        for split_point in range(deepest, self.context.s_min - 1, -1):
            rank = self.largest_uniform_rank(split_point, weakest)
            if rank > 0:
                return split_point, rank
        raise UsageError(
            f"the weakest client's budget of {format_bytes(weakest)} holds no adapters of a common rank at any "
            f"cut from {self.context.s_min} to {deepest}; give larger budgets or smaller rank levels."
        )

    def armsc(self, importance: Mapping[str, float]) -> Plan:
        c = self.context
        return plan(importance, self.budgets, c.memory, c.server_budget, c.levels, c.rho, c.s_min)
