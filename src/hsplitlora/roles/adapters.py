"""What a client and the main server share: the adapters they train for one client on the blocks
they run, their anchors and optimizer state, and the one checkpoint schema of all of it."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

import torch

from hsplitlora.lora.attach import Candidate
from hsplitlora.method.aggregation import AdapterFactors
from hsplitlora.method.importance import candidate_layers
from hsplitlora.roles.messages import AdapterBroadcast, ModelUpdate


def adapter_name(client_id: int) -> str:
    return f"client{client_id}"


class AdapterHolder:
    """What a client and the main server share: adapters on the candidates of the blocks they
    run for one client, created, resized, uploaded, merged, anchored or overwritten by aggregation
    results, and their optimizer state (one schema for checkpoints: `adapter_state`)."""

    def __init__(
        self, candidates: Mapping[str, Candidate], alpha: float, lr: float, generator: torch.Generator, seed: int = 0,
        scaling: str = "standard",
    ):  # fmt: skip
        self.candidates = dict(candidates)
        self.alpha = alpha
        self.scaling = scaling  # lora_scale's rule: standard (alpha / r) or rslora (alpha / sqrt(r))
        self.lr = lr
        self.generator = generator
        self.seed = seed  # of the run: adapters that are averaged factor by factor start alike everywhere
        # (adapter, candidate) -> how the fed server knows the anchor: "zero", "held" or "sent"
        # (see AdapterFactors); "uploaded" between the upload and the anchor's move.
        self.anchor_status: dict[tuple[str, str], str] = {}

    def _layers(self, part: torch.nn.Module) -> dict:
        return candidate_layers(part, self.candidates)

    def create_adapters(self, part: torch.nn.Module, name: str, ranks: Mapping[str, int]) -> None:
        """Every adapter fresh (A random, B = 0), at the plan's ranks."""
        for candidate, layer in self._layers(part).items():
            layer.set_adapter(
                name, self.candidates[candidate].slot, ranks.get(candidate, 0), self.alpha, self.generator, self.scaling
            )
            self.anchor_status[(name, candidate)] = "zero"

    def configure_adapters(self, part: torch.nn.Module, name: str, ranks: Mapping[str, int], lifecycle: str) -> None:
        """The round's adapters: fresh (recreate), or the kept ones resized to the plan's ranks
        (new ones fresh); under `anchor` every adapter is anchored at its factors."""
        if lifecycle == "recreate":
            self.create_adapters(part, name, ranks)
            return
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            before, rank = layer.rank(name, slot), ranks.get(candidate, 0)
            generator = self.generator
            if lifecycle == "overwrite" and before == 0:
                # Factor averaging needs one initial A for every client, as a server that hands out
                # the global adapter gives (a rank-r A is the first r rows of a larger one).
                generator = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(candidate.encode()))
            layer.resize_adapter(name, slot, rank, self.alpha, generator, self.scaling)
            if before != rank:
                self.anchor_status[(name, candidate)] = "zero" if before == 0 else "sent"
            if lifecycle == "anchor" and rank and layer.anchor(name, slot) is None:
                layer.set_anchor(name, slot)

    def parameters(self, part: torch.nn.Module | None, name: str) -> list[torch.nn.Parameter]:
        if part is None:
            return []
        unique = {id(layer): layer for layer in self._layers(part).values()}  # q, k, v share GPT-2's c_attn
        return [p for layer in unique.values() for p in layer.adapter_parameters(name)]

    def new_optimizer(
        self, part: torch.nn.Module | None, name: str, previous: torch.optim.Optimizer | None = None
    ) -> torch.optim.Optimizer | None:
        """AdamW over the adapters; with `previous`, kept adapters keep their optimizer state."""
        params = self.parameters(part, name)
        if not params:
            return None
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        if previous is not None:
            for param in params:
                if param in previous.state:
                    optimizer.state[param] = previous.state[param]
        return optimizer

    def factors(self, part: torch.nn.Module, name: str, client_id: int, samples: int) -> dict[str, AdapterFactors]:
        """Each adapter's current factors and how the fed server finds its anchor."""
        out = {}
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            found = layer.factors(name, slot)
            if found is None:
                continue
            a, b, scale = found
            status = self.anchor_status.get((name, candidate), "zero")
            anchor = layer.anchor(name, slot) if status == "sent" else None
            # Uploads leave the holder's device: the fed server aggregates on the CPU.
            out[candidate] = AdapterFactors(
                client_id, samples, _sent(a), _sent(b), scale, status,
                *((_sent(anchor[0]), _sent(anchor[1])) if anchor is not None else (None, None)),
            )  # fmt: skip
        return out

    def upload(self, part: torch.nn.Module, name: str, client_id: int, samples: int) -> dict[str, AdapterFactors]:
        """The factors for the fed server, which keeps them as the next round's anchors."""
        factors = self.factors(part, name, client_id, samples)
        for candidate in factors:
            self.anchor_status[(name, candidate)] = "uploaded"
        return factors

    @torch.no_grad()
    def merge(self, part: torch.nn.Module, update: ModelUpdate) -> None:
        for candidate, layer in self._layers(part).items():
            delta = update.deltas.get(candidate)
            if delta is not None:
                layer.merge(
                    self.candidates[candidate].slot, delta if isinstance(delta, torch.Tensor) else delta.dense()
                )

    @torch.no_grad()
    def advance_anchors(self, part: torch.nn.Module, name: str) -> None:
        """After W absorbed the round's update: every adapter's anchor moves to its factors. The fed
        server holds what was uploaded; an adapter it did not get (a lost client's) sends its anchor."""
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            if layer.factors(name, slot) is None:
                continue
            layer.set_anchor(name, slot)
            uploaded = self.anchor_status.get((name, candidate)) == "uploaded"
            self.anchor_status[(name, candidate)] = "held" if uploaded else "sent"

    @torch.no_grad()
    def overwrite(self, part: torch.nn.Module, name: str, broadcast: AdapterBroadcast) -> None:
        """Take the aggregated adapters, truncated to this holder's own rank of each. A holder of a
        higher rank than the broadcast's (a client not sampled this round) takes its rows and zeroes
        the rest of B, so that its product is the aggregate's, as everyone's."""
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            found = layer.factors(name, slot)
            if found is None or candidate not in broadcast.factors:
                continue
            a, b, scale = found
            avg_a, avg_scaled_b = broadcast.factors[candidate]
            rank = min(a.shape[0], avg_a.shape[0])
            a[:rank].copy_(avg_a[:rank])
            b[:, :rank].copy_(avg_scaled_b[:, :rank] / scale)
            b[:, rank:].zero_()  # A keeps its rows there, so they can train again (B = 0, as a new adapter)

    def deltas(self, part: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
        """What each adapter adds to its weight, (alpha/r)(B A - B0 A0), dense."""
        return {candidate: layer.delta(name, self.candidates[candidate].slot).detach().cpu()
                for candidate, layer in self._layers(part).items()
                if layer.factors(name, self.candidates[candidate].slot) is not None}  # fmt: skip

    # -- checkpoints: the one schema of an adapter's state ------------------------------------------
    def adapter_state(
        self, part: torch.nn.Module, name: str, optimizer: torch.optim.Optimizer | None
    ) -> dict[str, torch.Tensor]:
        """`{candidate}/A`, `/B`, the anchor `/A0`, `/B0`, `/anchor` (ANCHOR_CODES) and AdamW's
        `/A.exp_avg`, `/A.exp_avg_sq`, `/A.step` (likewise for B)."""
        out: dict[str, torch.Tensor] = {}
        state = optimizer.state if optimizer is not None else {}
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            if layer.factors(name, slot) is None:
                continue
            a, b = layer.lora_A[slot][name], layer.lora_B[slot][name]
            tensors = {"A": a.detach(), "B": b.detach()}
            anchor = layer.anchor(name, slot)
            if anchor is not None:
                tensors["A0"], tensors["B0"] = anchor
            status = self.anchor_status.get((name, candidate), "zero")
            tensors["anchor"] = torch.tensor(ANCHOR_CODES.index(status))
            for key, param in (("A", a), ("B", b)):
                for field_name, value in state.get(param, {}).items():
                    tensors[f"{key}.{field_name}"] = value
            out.update({f"{candidate}/{k}": v.clone().contiguous() for k, v in tensors.items()})
        return out

    @torch.no_grad()
    def load_adapter_state(
        self, part: torch.nn.Module, name: str, tensors: Mapping[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None,
    ) -> None:  # fmt: skip
        """The inverse of `adapter_state`, on adapters already configured at the saved ranks."""
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            if layer.factors(name, slot) is None or f"{candidate}/A" not in tensors:
                continue
            a, b = layer.lora_A[slot][name], layer.lora_B[slot][name]
            a.copy_(tensors[f"{candidate}/A"])
            b.copy_(tensors[f"{candidate}/B"])
            if f"{candidate}/A0" in tensors:
                layer.anchors[(name, slot)] = (tensors[f"{candidate}/A0"].to(a.device, copy=True),
                                               tensors[f"{candidate}/B0"].to(b.device, copy=True))  # fmt: skip
            else:
                layer.anchors.pop((name, slot), None)
            self.anchor_status[(name, candidate)] = ANCHOR_CODES[int(tensors[f"{candidate}/anchor"])]
            if optimizer is not None:
                for key, param in (("A", a), ("B", b)):
                    # AdamW keeps its step count on the CPU, its moments beside the parameter.
                    saved = {f: tensors[f"{candidate}/{key}.{f}"].to("cpu" if f == "step" else param.device, copy=True)
                             for f in ADAMW_FIELDS if f"{candidate}/{key}.{f}" in tensors}  # fmt: skip
                    if saved:
                        optimizer.state[param] = saved


def _sent(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of `tensor` as it leaves its holder: detached, on the CPU."""
    return tensor.detach().to("cpu", copy=True)


ANCHOR_CODES = ("zero", "held", "sent", "uploaded")
ADAMW_FIELDS = ("step", "exp_avg", "exp_avg_sq")
