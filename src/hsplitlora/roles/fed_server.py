"""The fed server: aggregates all adapters once per round and sends the update back. It never
sees data or activations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from hsplitlora.method.aggregation import AdapterFactors, Aggregation, ExactChange
from hsplitlora.roles.messages import AdapterBroadcast, AdapterUpload, ModelUpdate


class NonFiniteUpdate(ValueError):
    """An aggregated update holds NaN or infinity (the run must stop, as for a NaN loss)."""


class FedServer:
    """Aggregates with the strategy's rule (method/aggregation.py): a change merged into every copy
    of W (NAA's exact stacked change, or the zero-padded average of the no-naa ablation), or
    averaged factors broadcast for the holders to keep training. It keeps every client's last
    upload: that is the adapter's anchor at the next round, so clients upload only their current
    factors."""

    def __init__(self, rule: Aggregation | None = None, compression: str = "fp32"):
        self.rule = rule or ExactChange()
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
        results = {}
        for name, factors in grouped.items():
            anchors = [self.anchor_of(name, f) if self.rule.reads_anchors else None for f in factors]
            results[name] = self.rule.combine(factors, anchors)
            _check_finite(name, *(results[name].tensors() if self.rule.merges else results[name]))
        if not self.rule.merges:
            return AdapterBroadcast(round_, results)
        deltas = {}
        for name, stacked in results.items():
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
