"""HSplitLoRA (method.md sections 3-6) and its ablations."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import suppress

from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import ZERO_PAD_TRUNCATE, Aggregation, ExactChange, MergedZeroPad
from hsplitlora.method.planner import Plan, client_plan, plan
from hsplitlora.strategies.base import StrategyContext
from hsplitlora.strategies.splitlora import UniformPlanning


class HSplitLoRA(UniformPlanning):
    """IWI importance -> ARMSC cuts and ranks -> NAA's exact aggregation of what every adapter
    changed this round, merged into every copy of W; adapters persist with their optimizer state
    and an anchor (adapter_lifecycle persist), or are re-created every round (recreate)."""

    name = "hsplitlora"
    aggregation = ExactChange()
    adapter_lifecycles = True
    times_ranks = True

    def __init__(self, context: StrategyContext):
        super().__init__(context)
        self.split_points: list[int] | None = None  # chosen at the first plan, kept by re-plans

    def update_rule(self, context: StrategyContext) -> tuple[Aggregation, str]:
        """NAA, with adapters anchored (persist) or re-created (recreate)."""
        return type(self).aggregation, "anchor" if context.adapter_lifecycle == "persist" else "recreate"

    def resume_cuts(self, split_points: list[int]) -> None:
        self.split_points = list(split_points)

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        """Cuts follow the devices: chosen once with uniform importance (the same whatever the
        warm-up measured, so actors can load their blocks first); ranks follow importance."""
        c = self.context
        uniform = dict.fromkeys(c.memory.candidates, 1.0)
        if self.split_points is None:
            first = self.armsc(uniform)
            self.split_points = [0] * len(c.devices)
            for client in first.clients:
                self.split_points[client.client] = client.split_point
        return self.armsc(importance or uniform, self.split_points)

    def armsc(self, importance: Mapping[str, float], split_points: list[int] | None = None,
              leave_out_infeasible: bool = False) -> Plan:  # fmt: skip
        """ARMSC (method.md section 4): the cuts by the context's split rule (fastest: against the
        deepest-fit and the best uniform plans too), unless `split_points` fixes them; ranks by the
        importance greedy on both sides. `leave_out_infeasible`: a client no cut fits is left out
        of the plan instead of stopping it."""
        c = self.context
        fastest = c.split_rule == "fastest" and split_points is None
        alternatives = []
        if fastest:
            with suppress(UsageError):  # no uniform plan exists; the planner says why its own cuts fail, if they do
                alternatives.append(self.best_uniform_plan())
        timed = fastest or c.rank_time_slack is not None
        return plan(importance, self.budgets, c.memory, c.server_budget, c.levels, c.rho, c.s_min,
                    split_rule=c.split_rule, round_time=self.round_time if timed else None,
                    split_points=split_points, alternatives=alternatives, sharing=c.clients_per_round,
                    leave_out_infeasible=leave_out_infeasible, rank_time_slack=c.rank_time_slack,
                    round_times=self.round_times if timed else None)  # fmt: skip


class NoIWI(HSplitLoRA):
    """ARMSC's cuts, but uniform ranks (the largest level that fits) instead of importance-driven."""

    name = "no-iwi"
    uses_importance = False
    times_ranks = False  # the largest uniform rank per client that fits its memory

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        base = super().plan(None)
        memory = self.context.memory
        clients = []
        for client in base.clients:
            rank = self.largest_uniform_rank(client.split_point, client.budget_bytes)
            server_rank = self.largest_uniform_rank(client.split_point, client.budget_bytes, server_side=True)
            ranks = dict.fromkeys(client.ranks, rank)
            server_ranks = dict.fromkeys(client.server_ranks, server_rank)
            clients.append(client_plan(client.client, client.budget_bytes, client.split_point, ranks, server_ranks,
                                       memory, self.context.rho))  # fmt: skip
        return Plan(clients, base.server_budget_bytes, base.server_frozen_bytes, base.levels,
                    tail_blocks=base.tail_blocks, sharing=base.sharing)  # fmt: skip


class NoARMSC(HSplitLoRA):
    """ARMSC replaced by the best uniform cut and rank (as `splitlora` chooses them), keeping NAA
    and its adapter life cycle. The rank is the largest uniform level that fits with NAA's memory
    (anchors included) and the cut the fastest under NAA's download, so it can differ from
    splitlora's: the plan (metrics.jsonl, per client) says which it runs."""

    name = "no-armsc"
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.best_uniform_plan()


class NoARMSCPaper(NoARMSC):
    """ARMSC replaced by the paper SplitLoRA's rule (the weakest budget's deepest cut and largest
    uniform rank, with NAA's memory: anchors included, so often a lower rank than splitlora-paper's)."""

    name = "no-armsc-paper"
    times_ranks = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.splitlora_plan()


class NoNAA(HSplitLoRA):
    """HSplitLoRA with zero-padded averaging of the factors instead of NAA: the averaged factors
    sent back and truncated to each holder's rank (persist), or merged with their cross terms
    (recreate)."""

    name = "no-naa"

    def update_rule(self, context: StrategyContext) -> tuple[Aggregation, str]:
        if context.adapter_lifecycle == "persist":
            return ZERO_PAD_TRUNCATE, "overwrite"
        return MergedZeroPad(), "recreate"
