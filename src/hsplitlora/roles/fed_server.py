"""The fed server: aggregates all adapters once per round and sends the update back. It never
sees data or activations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from hsplitlora.method.aggregation import AdapterFactors, StackedDelta, aggregate, fedavg_factors, zero_padded_average
from hsplitlora.roles.messages import AdapterBroadcast, AdapterUpload, ModelUpdate

MERGING = ("naa", "zero-pad")  # dW merged into W, adapters re-created fresh
PERSISTING = ("fedavg", "zero-pad-truncate")  # aggregated adapters sent back, kept training


class FedServer:
    def __init__(self, aggregator: str = "naa"):
        if aggregator not in MERGING + PERSISTING:
            raise ValueError(f"unknown aggregator {aggregator!r}")
        self.aggregator = aggregator

    @staticmethod
    def by_candidate(uploads: Sequence[AdapterUpload]) -> dict[str, list[AdapterFactors]]:
        """Every candidate's adapters over the clients that trained one on it this round."""
        grouped: dict[str, list[AdapterFactors]] = defaultdict(list)
        for upload in uploads:
            for name, factors in upload.factors.items():
                if factors.rank > 0 and upload.samples > 0:
                    grouped[name].append(factors)
        return dict(grouped)

    def aggregate(self, round_: int, uploads: Sequence[AdapterUpload]) -> ModelUpdate | AdapterBroadcast:
        grouped = self.by_candidate(uploads)
        if self.aggregator in PERSISTING:
            average = fedavg_factors if self.aggregator == "fedavg" else zero_padded_average
            return AdapterBroadcast(round_, {name: average(factors) for name, factors in grouped.items()})
        deltas: dict[str, StackedDelta | torch.Tensor] = {}
        for name, factors in grouped.items():
            if self.aggregator == "naa":
                stacked = aggregate(factors)
            else:  # no-naa: the zero-padded average, merged (its cross terms included)
                a, b = zero_padded_average(factors)
                stacked = StackedDelta(b, a)
            d_out, d_in = stacked.b.shape[0], stacked.a.shape[1]
            # Send whichever is smaller: the stacked factors or the dense matrix.
            deltas[name] = stacked if stacked.numel() < d_out * d_in else stacked.dense()
        return ModelUpdate(round_, deltas)
