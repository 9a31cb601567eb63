"""The fed server: aggregates all adapters once per round and sends the update back. It never
sees data or activations."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence

import torch

from hsplitlora.compression import pack
from hsplitlora.config import DEFAULT_COMPRESSION
from hsplitlora.method.aggregation import AdapterFactors, Aggregation, ExactChange, StackedDelta, sample_weights
from hsplitlora.roles.messages import AdapterBroadcast, AdapterUpload, ModelUpdate, OwnTerm, PartialStack


class NonFiniteUpdate(ValueError):
    """An aggregated update holds NaN or infinity (the run must stop, as for a NaN loss)."""


class FedServer:
    """Aggregates with the strategy's rule (method/aggregation.py): a change merged into every copy
    of W (NAA's exact stacked change, or the zero-padded average of the no-naa ablation), or
    averaged factors broadcast for the holders to keep training. It keeps every client's last
    upload: that is the adapter's anchor at the next round, so clients upload only their current
    factors. A receiver is sent a stacked change without the terms it holds (`update_for`); under
    error feedback (`TruncatedChange`) it keeps per candidate the residual R it has not sent."""

    def __init__(self, rule: Aggregation | None = None, compression: str = DEFAULT_COMPRESSION):
        self.rule = rule or ExactChange()
        self.compression = compression  # of the update sent down
        self.previous: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}  # (client, name) -> (A, B)
        self.residual: dict[str, torch.Tensor] = {}  # candidate -> R, under error feedback
        # The last round's stacked changes by term: candidate -> (packed b, packed a, [(client, weight,
        # anchored, columns of b, rows of a)]), what `update_for` slices for each receiver.
        self.terms: dict[str, tuple] = {}

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
        if getattr(self.rule, "error_feedback", False):
            update = self._truncated(round_, results)
        else:
            deltas = {}
            for name, stacked in results.items():
                d_out, d_in = stacked.b.shape[0], stacked.a.shape[1]
                # Send whichever is smaller: the stacked factors or the dense matrix.
                deltas[name] = stacked if stacked.numel() < d_out * d_in else stacked.dense()
            update = ModelUpdate.packed(round_, deltas, self.compression)
            self._keep_terms(grouped, deltas)
        # Each upload becomes its adapter's anchor once the update is merged.
        for upload in uploads:
            for name, factors in upload.factors.items():
                self.previous[(factors.client, name)] = (factors.a, factors.b)
        return update

    def _keep_terms(self, grouped: dict[str, list[AdapterFactors]], deltas: dict) -> None:
        """Each stacked change by term, compressed whole (scales over the whole stack), for `update_for`."""
        self.terms = {}
        for name, delta in deltas.items():
            if not isinstance(delta, StackedDelta) or not self.rule.reads_anchors:
                continue
            factors = grouped[name]
            layout = []
            for weight, f in zip(sample_weights(factors), factors, strict=True):
                anchor = self.anchor_of(name, f)
                rows = f.rank + (0 if anchor is None else len(anchor[0]))
                layout.append((f.client, weight, anchor is not None, rows))
            self.terms[name] = (pack(delta.b, self.compression), pack(delta.a, self.compression), layout)

    def update_for(self, update: ModelUpdate, names: set[str] | None, held: Mapping[str, set[int]]) -> ModelUpdate:
        """`update` as sent to one receiver: the candidates it holds (`names`; None: every one), each
        stacked change without the terms of the adapters it holds (`held[name]`: their clients),
        which it rebuilds in the canonical order (`PartialStack.rebuild`: bit-identical)."""
        deltas, sizes = {}, {}
        for name, delta in update.deltas.items():
            if names is not None and name not in names:
                continue
            own = held.get(name, set())
            if name not in self.terms or not own & {client for client, *_ in self.terms[name][2]}:
                deltas[name], sizes[name] = delta, update.sizes[name]
                continue
            packed_b, packed_a, layout = self.terms[name]
            int8 = self.compression == "int8"
            pieces, start = [], 0
            for client, weight, anchored, rows in layout:
                if client in own:
                    pieces.append(OwnTerm(client, weight, anchored))
                else:
                    cut = slice(start, start + rows)
                    pieces.append((packed_b.data[:, cut], packed_a.data[cut], packed_a.scale[cut] if int8 else None))
                start += rows
            shared_a = None if int8 else packed_a.scale  # int8 scales a row by row: each piece has its own
            deltas[name] = PartialStack(self.compression, pieces, packed_b.scale, shared_a)
            sizes[name] = deltas[name].nbytes()
        return ModelUpdate(update.round, deltas, sizes)

    def _truncated(self, round_: int, results: dict[str, StackedDelta]) -> ModelUpdate:
        """Error feedback: U = best rank-k of (dW + R) goes down (factors or dense, whichever is
        smaller, in the run's compression), and R <- dW + R - U with U as the receivers merge it."""
        self.terms = {}
        deltas, targets = {}, {}
        for name, stacked in results.items():
            targets[name] = stacked.dense().float()
            if name in self.residual:
                targets[name] = targets[name] + self.residual[name]
            low = StackedDelta(*self.rule.truncate(targets[name]))
            deltas[name] = low if low.numel() < targets[name].numel() else low.dense()
        update = ModelUpdate.packed(round_, deltas, self.compression)
        for name, target in targets.items():
            sent = update.deltas[name]
            self.residual[name] = (target - (sent.dense() if isinstance(sent, StackedDelta) else sent)).contiguous()
        return update

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The uploads it holds (the anchors of the next round) and, under error feedback, the
        residual of every candidate (`residual/{name}`), for checkpoints."""
        state = {f"{client}/{name}/{part}": tensor for (client, name), pair in self.previous.items()
                 for part, tensor in zip("AB", pair, strict=True)}  # fmt: skip
        return state | {f"residual/{name}": tensor for name, tensor in self.residual.items()}

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        self.previous = {}
        self.residual = {key.split("/", 1)[1]: t.clone() for key, t in tensors.items() if key.startswith("residual/")}
        for key in tensors:
            if key.startswith("residual/"):
                continue
            client, name, part = key.split("/")
            if part == "A":
                self.previous[(int(client), name)] = (tensors[key], tensors[f"{client}/{name}/B"])


def _check_finite(name: str, *tensors: torch.Tensor) -> None:
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteUpdate(f"the aggregated update of {name} is not finite (NaN or infinity)")
