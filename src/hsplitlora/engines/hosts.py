"""Hosts: a role (Client or MainServer) with the modules it computes on. Every engine runs these
same hosts and differs only in where their modules come from and how a call reaches them: in one
process every host shares the model (the main server may hold a copy of its own on another
device) and a call is a method call; under Ray each host is an actor that loaded only its blocks
and a call goes through the object store (engines/transport.py). Wherever a host lives, its role
is built here, one way, from the run's `HostSpec` (`client_role`, `server_role`).

The hosts' one-line methods that pass a call on to the role are the calls the protocol makes: a
Ray actor or a Flower node is reached only through its host's own methods (an actor's method
by name, a node's `query.<method>`), so the role behind it cannot be called directly."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hsplitlora.data.e2e import Encoded, client_batchers
from hsplitlora.engines.spec import HostSpec
from hsplitlora.lora.attach import Candidate
from hsplitlora.method.aggregation import term_rows
from hsplitlora.models.architectures import Architecture
from hsplitlora.models.loading import held_parameter_names
from hsplitlora.models.split import ClientPart, ServerPart, UClientPart, client_part, server_part
from hsplitlora.roles.adapters import adapter_name
from hsplitlora.roles.client import Client
from hsplitlora.roles.cut import Cut
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import AdapterBroadcast, ModelUpdate, OwnTerm, PartialStack, RoundPlan


def client_blocks(split_point: int, num_blocks: int, tail_blocks: int | None) -> list[int]:
    """The blocks a client holds: [0, s), and [L - t, L) in a U-shaped split (all when s = L)."""
    tail = range(num_blocks - tail_blocks, num_blocks) if tail_blocks is not None and split_point < num_blocks else ()
    return sorted({*range(min(split_point, num_blocks)), *tail})


def client_role(
    spec: HostSpec, client_id: int, items: Sequence[Encoded], candidates: Mapping[str, Candidate]
) -> Client:
    """Client `client_id` on the spec's client device: its examples in its seeded batch order (and
    its warm-up stream), its `Cut` in the run's compression, the run's DP."""
    batches, warmup = client_batchers(
        list(items), spec.batch_size, spec.pad_id, spec.seed, client_id, spec.dp.sgd_batches if spec.dp.sgd else 1
    )
    return Client(client_id, batches, candidates, spec.lr, spec.alpha, spec.seed, spec.compression,
                  spec.client_device, warmup, Cut(spec.compression), spec.dp, spec.lora_scaling)  # fmt: skip


def server_role(
    spec: HostSpec, candidates: Mapping[str, Candidate], cuts: Mapping[int, Cut] | None = None
) -> MainServer:
    """The main server on the spec's server device; `cuts`: the clients' own `Cut`s when they live
    in this process (else it builds one per client in the run's compression)."""
    return MainServer(candidates, spec.lr, spec.alpha, spec.seed, spec.compression, spec.server_device, cuts, spec.dp,
                      spec.lora_scaling)  # fmt: skip


class Host:
    """What both host kinds share: a (partial) model with LoRA layers on the candidates it holds."""

    def __init__(self, model: torch.nn.Module, arch: Architecture, candidates: Mapping[str, Candidate], role):
        self.model = model
        self.arch = arch
        self.num_blocks = arch.num_blocks(model)
        self.candidates = dict(candidates)  # those in the blocks this host holds
        self.role: Client | MainServer = role
        self.quant = "none"  # how this role's blocks compute W x: client_quant or server_quant

    def measure_importance(self, enabled: bool) -> None:
        self.role.measure_importance(enabled)

    def apply_update(self, update: ModelUpdate, merge: bool, sampled: Sequence[int] | None = None) -> None:
        """Merge dW into this host's copy of the weights if it is the one to (`merge`), then move
        the anchors of the role's persistent adapters of the `sampled` clients (None: all)."""
        if merge:
            self.merge(update)
        self.role.apply_update(update, merge=False, sampled=sampled)

    def apply_adapters(self, broadcast: AdapterBroadcast) -> None:
        self.role.apply_adapters(broadcast)

    def held_parameter_names(self) -> list[str]:
        return held_parameter_names(self.model)

    def weights(
        self, names: Sequence[str], full: bool = False, skip: Sequence[str] = (), as_computed: bool = False
    ) -> dict[str, torch.Tensor]:
        """Current weights on the CPU: candidates by name, or (`full`) every frozen parameter whose
        name starts with one of `names`, except those in `skip` (already found elsewhere). With
        `as_computed`, candidates as this role computes them: dequantized when it quantizes."""
        if as_computed and self.quant != "none":
            return {n: self._computed_weight(n) for n in names if n in self.candidates}
        if full:
            skip = set(skip)
            return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                    if "lora_" not in n and not p.is_meta and n not in skip
                    and any(n.startswith(k) for k in names)}  # fmt: skip
        return {n: self._weight(n).detach().to("cpu", copy=True).contiguous() for n in names if n in self.candidates}

    def _weight(self, name: str) -> torch.Tensor:
        candidate = self.candidates[name]
        return self.model.get_submodule(candidate.module).weight(candidate.slot)

    def _computed_weight(self, name: str) -> torch.Tensor:
        candidate = self.candidates[name]
        lo, hi = (layer := self.model.get_submodule(candidate.module)).slot_bounds[candidate.slot]
        return layer.quantized(self.quant).dequantize()[lo:hi].to("cpu", copy=True).contiguous()

    @torch.no_grad()
    def set_weights(self, weights: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, weight in weights.items():
            if name in self.candidates:
                candidate = self.candidates[name]
                self.model.get_submodule(candidate.module).set_weight(candidate.slot, weight)
            elif name in params and not params[name].is_meta:
                params[name].copy_(weight)

    @torch.no_grad()
    def merge(self, update: ModelUpdate) -> None:
        """W += dW for every candidate this host holds (once per copy of the weights)."""
        for name, delta in update.deltas.items():
            candidate = self.candidates.get(name)
            if candidate is not None:
                if isinstance(delta, PartialStack):  # sent without the terms this copy holds: rebuild
                    delta = delta.rebuild(lambda term, name=name: self.own_rows(name, term))
                dense = delta if isinstance(delta, torch.Tensor) else delta.dense()
                self.model.get_submodule(candidate.module).merge(candidate.slot, dense)

    def own_rows(self, name: str, term: OwnTerm) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a term this host holds (client `term.client`'s adapter on `name`), computed
        on the CPU from its factors and anchor as the fed server computes them."""
        candidate = self.candidates[name]
        layer = self.model.get_submodule(candidate.module)
        a, b, scale = layer.factors(adapter_name(term.client), candidate.slot)
        anchor = layer.anchor(adapter_name(term.client), candidate.slot) if term.anchored else None
        cpu = [t.detach().to("cpu", copy=True) for t in (a, b, *(anchor or ()))]
        return term_rows(term.weight, scale, cpu[0], cpu[1], (cpu[2], cpu[3]) if anchor is not None else None)


class ClientHost(Host):
    def __init__(self, model: torch.nn.Module, arch: Architecture, candidates: Mapping[str, Candidate], client: Client):
        super().__init__(model, arch, candidates, client)
        self.client = client

    def configure(self, plan: RoundPlan) -> None:
        """The round's part: blocks [0, s) (and the tail when U-shaped), or with s = L the whole
        model and its head (no split)."""
        if plan.split_point >= self.num_blocks:
            head = ServerPart(self.arch, self.model, self.num_blocks)
            part = ClientPart(self.arch, self.model, plan.split_point)
            part.quant = self.quant
            self.client.configure(plan, part, head=head)
        else:
            part = client_part(self.arch, self.model, plan.split_point, plan.tail_blocks)
            part.quant = self.quant
            (part.front if isinstance(part, UClientPart) else part).recompute = plan.recompute
            self.client.configure(plan, part)

    def forward(self):
        return self.client.forward()

    def tail_step(self, middle):
        return self.client.tail_step(middle)

    def backward(self, gradient):
        return self.client.backward(gradient)

    def local_step(self) -> float:
        return self.client.local_step()

    def importance_report(self) -> tuple[dict[str, float], int]:
        return self.client.importance_report()

    def warm_up(self, enabled: bool) -> None:
        self.client.warm_up(enabled)

    def counters(self) -> dict[str, int]:
        return {"samples": self.client.samples, "tokens": self.client.tokens, **self.client.private_steps()}

    def upload(self):
        return self.client.upload()

    def adapter_deltas(self) -> dict[str, torch.Tensor]:
        return self.client.adapter_deltas()

    def state_dict(self, adapters: bool) -> tuple[dict, dict[str, torch.Tensor]]:
        return self.client.state_dict(adapters)

    def load_state_dict(self, state: dict, tensors: Mapping[str, torch.Tensor]) -> None:
        self.client.load_state_dict(state, tensors)

    def validation_forward(self, batch, adapter: str | None):
        return self.client.validation_forward(batch, adapter)

    def validation_tail(self, middle, batch, adapter: str | None) -> tuple[float, int]:
        return self.client.validation_tail(middle, batch, adapter)

    def validation_local(self, batch, adapter: str | None) -> tuple[float, int]:
        return self.client.validation_local(batch, adapter)


class ServerHost(Host):
    def __init__(
        self, model: torch.nn.Module, arch: Architecture, candidates: Mapping[str, Candidate], server: MainServer
    ):
        super().__init__(model, arch, candidates, server)
        self.server = server

    def configure(self, plan: RoundPlan) -> None:
        part = server_part(self.arch, self.model, plan.split_point, plan.tail_blocks)
        part.quant = self.quant
        self.server.configure(plan, part)

    def step(self, activations):
        return self.server.step(activations)

    def forward_middle(self, activations):
        return self.server.forward_middle(activations)

    def backward_middle(self, tail_gradient):
        return self.server.backward_middle(tail_gradient)

    def importance_report(self, client_id: int) -> tuple[dict[str, float], int]:
        return self.server.importance_report(client_id)

    def upload(self, client_id: int):
        return self.server.upload(client_id)

    def adapter_deltas(self, client_id: int) -> dict[str, torch.Tensor]:
        return self.server.adapter_deltas(client_id)

    def state_dict(self, adapters: bool) -> dict[str, torch.Tensor]:
        return self.server.state_dict(adapters)

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.server.load_state_dict(tensors)

    def validation_loss(self, activations, adapter: str | None) -> tuple[float, int]:
        return self.server.validation_loss(activations, adapter)

    def validation_middle(self, activations, adapter: str | None):
        return self.server.validation_middle(activations, adapter)
