"""Strategies: HSplitLoRA, its ablations and the baselines behind one interface."""

from hsplitlora.strategies.base import Strategy, StrategyContext
from hsplitlora.strategies.federated import CenLoRA, FedLoRA, FlexLoRA, FLoRA, FullFineTuning, HetLoRA
from hsplitlora.strategies.hsplitlora import HSplitLoRA, NoARMSC, NoARMSCPaper, NoIWI, NoNAA
from hsplitlora.strategies.splitlora import SplitLoRA, SplitLoRAPaper

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        HSplitLoRA,
        SplitLoRA,
        SplitLoRAPaper,
        HetLoRA,
        FLoRA,
        FlexLoRA,
        FedLoRA,
        CenLoRA,
        FullFineTuning,
        NoIWI,
        NoARMSC,
        NoARMSCPaper,
        NoNAA,
    )  # fmt: skip
}

__all__ = ["STRATEGIES", "Strategy", "StrategyContext"]
