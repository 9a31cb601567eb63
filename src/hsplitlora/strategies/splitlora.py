"""SplitLoRA: one cut and one rank for every client, FedAvg of A and B separately every round;
adapters and their optimizer state persist. `splitlora` takes the best uniform configuration the
time model and budgets allow (method.md section 7, revised); `splitlora-paper` the paper's rule.
`UniformPlanning` holds both rules: HSplitLoRA's fastest split rule and its no-armsc ablations use
them too."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import FEDAVG
from hsplitlora.method.planner import Plan, adapter_free_bytes, choose_split_point
from hsplitlora.strategies.base import Strategy
from hsplitlora.units import format_bytes


class UniformPlanning(Strategy):
    """One cut and one rank for every client: SplitLoRA's plans, and what HSplitLoRA's fastest
    split rule and its no-armsc ablations weigh against or run instead."""

    def largest_uniform_rank(self, split_point: int, budget: int, server_side: bool = False) -> int:
        memory = self.context.memory
        best = 0
        for level in sorted(self.context.levels):
            if server_side:
                share = self.server_share
                fits = memory.server_bytes(split_point, dict.fromkeys(memory.server_side(split_point), level)) <= share
            else:
                ranks = dict.fromkeys(memory.client_side(split_point), level)
                recompute = memory.recomputes(split_point, budget, self.context.rho, ranks)
                fits = memory.client_bytes(split_point, ranks, recompute) <= budget
            if fits:
                best = level
        return best

    def weakest_split_and_rank(self) -> tuple[int, int]:
        """The paper's SplitLoRA configuration: the deepest cut at which the weakest budget holds adapters of
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

    def splitlora_plan(self) -> Plan:
        """The paper's SplitLoRA plan: the weakest client's cut and uniform rank for everyone."""
        split_point, rank = self.weakest_split_and_rank()
        return self.uniform_plan(split_point, rank)

    def uniform_plan(self, split_point: int, rank: int) -> Plan:
        """One cut and one rank for every client, on every candidate of both sides."""
        count = len(self.context.devices)
        return self.fixed_plan([split_point] * count, [rank] * count)

    def uniform_ranks(self) -> dict[int, int]:
        """Per cut s that ARMSC allows for every client (adapter-free memory within (1 - rho) M_i on
        each client and within M_S / m on the server), the largest level of Q that every client's
        budget and the server's per-client share hold on all candidates of their side; cuts where
        no positive level fits are left out."""
        c, memory = self.context, self.context.memory
        share = self.server_share
        weakest = min(self.budgets)
        ranks = {}
        for split_point in range(c.s_min, memory.deepest_split_point + 1):
            too_large = adapter_free_bytes(memory, split_point, weakest, c.rho) > (1 - c.rho) * weakest
            if too_large or memory.server_bytes(split_point) > share:
                continue
            rank = min(self.largest_uniform_rank(split_point, weakest),
                       self.largest_uniform_rank(split_point, weakest, server_side=True))  # fmt: skip
            if rank > 0:
                ranks[split_point] = rank
        return ranks

    def best_uniform_split_and_rank(self) -> tuple[int, int]:
        """The best uniform SplitLoRA (ARMSC restricted to one cut and one rank): at each allowed cut
        the largest uniform rank that fits (as ARMSC fills the budget: a smaller rank would be
        predicted faster but learns less), and of those (cut, rank) pairs the one with the least
        predicted round time under this strategy's aggregation; ties go to the larger rank, then
        the shallower cut."""
        options = self.uniform_ranks()
        if not options:
            c = self.context
            raise UsageError(
                f"no single cut from {c.s_min} to {c.memory.deepest_split_point} holds adapters of one positive "
                f"rank within the weakest budget of {format_bytes(min(self.budgets))} and the main server's "
                f"per-client share of {format_bytes(self.server_share)}; give larger budgets or "
                "smaller rank levels."
            )
        best: tuple[float, int, int] | None = None
        for split_point, rank in options.items():  # shallow to deep: a tie keeps the shallower cut
            rank = self.timed_uniform_rank(split_point, rank)
            seconds = self.round_time(self.uniform_plan(split_point, rank).clients)
            if best is None or seconds < best[0] * (1 - 1e-9) or (seconds <= best[0] * (1 + 1e-9) and rank > best[2]):
                best = (seconds, split_point, rank)
        return best[1], best[2]

    def timed_uniform_rank(self, split_point: int, rank: int) -> int:
        """`rank`, or under rank_time_slack sigma the largest level up to it whose uniform plan at
        this cut predicts a round at most (1 + sigma) times the same cut's at the smallest positive
        level (ARMSC's rule, planner.fit_ranks_to_time, for one rank)."""
        slack = self.context.rank_time_slack
        if slack is None:
            return rank
        positive = [level for level in sorted(self.context.levels) if 0 < level <= rank]
        bound = (1 + slack) * self.round_time(self.uniform_plan(split_point, positive[0]).clients)
        fitting = [level for level in positive if self.round_time(self.uniform_plan(split_point, level).clients)
                   <= bound * (1 + 1e-9)]  # fmt: skip
        return max(fitting, default=positive[0])

    def best_uniform_plan(self) -> Plan:
        """SplitLoRA's plan (method.md section 7, revised): the best uniform cut and rank for all."""
        return self.uniform_plan(*self.best_uniform_split_and_rank())


class SplitLoRA(UniformPlanning):
    """The best uniform SplitLoRA: at every cut that every client's budget and the server's share
    allow, the largest rank that fits everywhere; of those, the cut with the least predicted round
    time (ties: the larger rank, then the shallower cut)."""

    name = "splitlora"
    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False
    times_ranks = True

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.best_uniform_plan()


class SplitLoRAPaper(SplitLoRA):
    """The paper's SplitLoRA: the deepest cut and largest uniform rank the weakest budget admits."""

    name = "splitlora-paper"
    times_ranks = False  # the paper's rule: memory only

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.splitlora_plan()
