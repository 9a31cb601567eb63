"""The baselines without split: every client runs the whole model, which weak devices could not
hold; their memory is reported beside the budgets, not limited by them (method.md section 7)."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.devices import DeviceProfile
from hsplitlora.method.aggregation import FEDAVG, SVD, ZERO_PAD_TRUNCATE, ExactChange
from hsplitlora.method.planner import Plan
from hsplitlora.strategies.base import Arrangement, Strategy


class _Unsplit(Strategy):
    """Every client runs the whole model: there is no cut, so no U-shaped split either."""

    splits = False


class FedLoRA(_Unsplit):
    """Federated LoRA, one rank for all (the largest level of Q); FedAvg of A and B; persistent."""

    name = "fedlora"
    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.unsplit_plan([max(self.context.levels)] * len(self.context.devices))


class _BudgetRanks(_Unsplit):
    """The heterogeneous-rank baselines: no split, a rank per client proportional to its budget
    (HetLoRA's rule); they differ in how the fed server aggregates and what adapters do next."""

    uses_importance = False

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.unsplit_plan(budget_proportional_ranks(self.budgets, self.context.levels))


class HetLoRA(_BudgetRanks):
    """HetLoRA: rank r_max M_i / max_j M_j (a level of Q) per client; zero-padded weighted averaging
    of the factors, truncated back to each client's rank; adapters persist."""

    name = "hetlora"
    aggregation = ZERO_PAD_TRUNCATE
    adapters = "overwrite"


class FLoRA(_BudgetRanks):
    """FLoRA: every client's (alpha/r) B A stacked exactly, merged into the weights, and every
    adapter re-initialised each round."""

    name = "flora"
    aggregation = ExactChange()
    adapters = "recreate"


class FlexLoRA(_BudgetRanks):
    """FlexLoRA: the dense weighted sum of every client's (alpha/r) B A, split back to each client's
    rank by truncated SVD; adapters persist."""

    name = "flexlora"
    aggregation = SVD
    adapters = "overwrite"


class _Centralised(_Unsplit):
    """The upper references: one trainer on the pooled data (the main server's machine, nothing
    sent between machines), as many samples per round as the K clients would train; nothing to
    sample or aggregate."""

    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False
    centralised = True

    @classmethod
    def arrange(cls, shards: list[list[int]], devices: list[DeviceProfile], local_steps: int,
                server: DeviceProfile) -> Arrangement:  # fmt: skip
        pooled = sorted(i for shard in shards for i in shard)
        note = f"{cls.name} is a centralised reference: it pools every client's data on one trainer."
        return Arrangement([pooled], [server], local_steps * len(shards), note)

    def sample(self, seed: int, round_: int, clients: int, per_round: int | None) -> list[int] | None:
        return None

    def aggregates(self) -> bool:
        return False


class CenLoRA(_Centralised):
    """Centralised LoRA on the pooled data (upper reference): one trainer, rank r_max everywhere."""

    name = "cenlora"

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.unsplit_plan([max(self.context.levels)])


class FullFineTuning(_Centralised):
    """Centralised full fine-tuning on the pooled data: every weight trained, no adapters."""

    name = "ft"
    full_finetune = True

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.unsplit_plan([0])


def budget_proportional_ranks(budgets: list[int], levels: tuple[int, ...]) -> list[int]:
    """HetLoRA's ranks: per client the largest level of Q not above r_max M_i / max_j M_j (at least
    the smallest positive level)."""
    ordered = sorted(levels)
    r_max, strongest = ordered[-1], max(budgets)
    return [max([r for r in ordered if r <= r_max * budget / strongest] + [ordered[1]]) for budget in budgets]
