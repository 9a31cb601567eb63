"""Strategies: HSplitLoRA, its ablations and the baselines behind one interface."""

from hsplitlora.strategies.base import Strategy, StrategyContext
from hsplitlora.strategies.federated import CenLoRA, FedLoRA, FullFineTuning, HetLoRA
from hsplitlora.strategies.hsplitlora import HSplitLoRA, NoARMSC, NoIWI, NoNAA
from hsplitlora.strategies.splitlora import SplitLoRA

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (HSplitLoRA, SplitLoRA, HetLoRA, FedLoRA, CenLoRA, FullFineTuning, NoIWI, NoARMSC, NoNAA)
}

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
