"""The baselines without split: every client runs the whole model, which weak devices could not
hold; their memory is reported beside the budgets, not limited by them (method.md section 7)."""

from __future__ import annotations

from collections.abc import Mapping

from hsplitlora.method.aggregation import FEDAVG, SVD, ZERO_PAD_TRUNCATE, ExactChange
from hsplitlora.method.planner import Plan
from hsplitlora.strategies.base import Strategy


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
        return self.unsplit_plan(self.hetlora_ranks())


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


class CenLoRA(_Unsplit):
    """Centralised LoRA on the pooled data (upper reference): one trainer, rank r_max everywhere."""

    name = "cenlora"
    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False
    centralised = True

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.unsplit_plan([max(self.context.levels)])


class FullFineTuning(_Unsplit):
    """Centralised full fine-tuning on the pooled data: every weight trained, no adapters."""

    name = "ft"
    aggregation = FEDAVG
    adapters = "overwrite"
    uses_importance = False
    centralised = True
    full_finetune = True

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        return self.unsplit_plan([0])
