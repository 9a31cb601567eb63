"""The fed server: aggregates all adapters once per round and sends the update back. It never
sees data or activations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from hsplitlora.method.aggregation import (
    AdapterFactors,
    StackedDelta,
    aggregate,
    fedavg_factors,
    svd_average,
    zero_padded_average,
)
from hsplitlora.roles.messages import AdapterBroadcast, AdapterUpload, ModelUpdate

MERGING = ("naa", "zero-pad")  # dW merged into every copy of W
BROADCASTING = {"fedavg": fedavg_factors, "zero-pad-truncate": zero_padded_average, "svd": svd_average}


class NonFiniteUpdate(ValueError):
    """An aggregated update holds NaN or infinity (the run must stop, as for a NaN loss)."""


class FedServer:
    """Aggregates with one of MERGING (NAA's exact stacked change, or the zero-padded average as
    the no-naa ablation) or BROADCASTING (averaged factors sent back for the holders to keep
    training). For NAA it keeps every client's last upload: that is the adapter's anchor at the
    next round, so clients upload only their current factors."""

    def __init__(self, aggregator: str = "naa", compression: str = "fp32"):
        if aggregator not in (*MERGING, *BROADCASTING):
            raise ValueError(f"unknown aggregator {aggregator!r}")
        self.aggregator = aggregator
        self.compression = compression  # of the update sent down
        self.previous: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (client, name) -> (A, B)

    @staticmethod
    def by_candidate(uploads: Sequence[AdapterUpload]) -> dict[str, list[AdapterFactors]]:
        """Every candidate's adapters over the clients that trained one on it this round."""
        grouped: dict[str, list[AdapterFactors]] = defaultdict(list)
        for upload in uploads:
            for name, factors in upload.factors.items():
                if factors.rank > 0 and upload.samples > 0:
                    grouped[name].append(factors)
        return dict(grouped)

    def anchor_of(self, name: str, factors: AdapterFactors) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A0, B0) the change of this upload is measured from (None: zero)."""
        if factors.anchor == "sent":
            return factors.anchor_a, factors.anchor_b
        if factors.anchor == "held":
            return self.previous[(factors.client, name)]
        return None

    def aggregate(self, round_: int, uploads: Sequence[AdapterUpload]) -> ModelUpdate | AdapterBroadcast:
        grouped = self.by_candidate(uploads)
        if self.aggregator in BROADCASTING:
            average = BROADCASTING[self.aggregator]
            averaged = {name: average(factors) for name, factors in grouped.items()}
            for name, pair in averaged.items():
                _check_finite(name, *pair)
            return AdapterBroadcast(round_, averaged)
        deltas: dict[str, StackedDelta | torch.Tensor] = {}
        for name, factors in grouped.items():
            if self.aggregator == "naa":
                stacked = aggregate(factors, [self.anchor_of(name, f) for f in factors])
            else:  # no-naa: the zero-padded average, merged (its cross terms included)
                a, b = zero_padded_average(factors)
                stacked = StackedDelta(b, a)
            _check_finite(name, stacked.a, stacked.b)
            d_out, d_in = stacked.b.shape[0], stacked.a.shape[1]
            # Send whichever is smaller: the stacked factors or the dense matrix.
            deltas[name] = stacked if stacked.numel() < d_out * d_in else stacked.dense()
        # Each upload becomes its adapter's anchor once the update is merged.
        for upload in uploads:
            for name, factors in upload.factors.items():
                self.previous[(factors.client, name)] = (factors.a, factors.b)
        return ModelUpdate.packed(round_, deltas, self.compression)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The uploads it holds (the anchors of the next round), for checkpoints."""
        return {f"{client}/{name}/{part}": tensor for (client, name), pair in self.previous.items()
                for part, tensor in zip("AB", pair, strict=True)}  # fmt: skip

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.previous = {}
        for key in tensors:
            client, name, part = key.split("/")
            if part == "A":
                self.previous[(int(client), name)] = (tensors[key], tensors[f"{client}/{name}/B"])


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteUpdate(f"the aggregated update of {name} is not finite (NaN or infinity)")
