"""The main server: the blocks after each client's cut, the head, and one adapter set and
optimizer per client. In a U-shaped split it runs only the middle blocks and never sees labels,
logits or the loss."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from hsplitlora.config import DEFAULT_COMPRESSION
from hsplitlora.lora.attach import Candidate, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.method.importance import ImportanceProbe
from hsplitlora.models.split import ServerPart, weights_dtype
from hsplitlora.privacy.dp import DPSGD, NO_DP, DPSettings, drop_records, keep_per_example, noise_generator
from hsplitlora.roles.adapters import AdapterHolder, adapter_name
from hsplitlora.roles.cut import Cut
from hsplitlora.roles.messages import (
    ActivationGradient,
    Activations,
    AdapterBroadcast,
    AdapterUpload,
    MiddleActivations,
    ModelUpdate,
    RoundPlan,
    TailGradient,
)


class MainServer:
    def __init__(
        self, candidates: Mapping[str, Candidate], lr: float, alpha: float = 16.0, seed: int = 0,
        compression: str = DEFAULT_COMPRESSION, device: torch.device | str = "cpu",
        cuts: Mapping[int, Cut] | None = None, dp: DPSettings = NO_DP, lora_scaling: str = "standard",
    ):  # fmt: skip
        self.lr = lr
        self.device = torch.device(device)  # where its parts compute; arriving tensors are moved here
        self.compression = compression  # of the cuts it builds for clients that live elsewhere
        self.cuts: dict[int, Cut] = dict(cuts or {})  # per client: in one process, the client's own
        self.generator = torch.Generator().manual_seed(seed * 100_003 + 99_991)
        self.holder = AdapterHolder(candidates, alpha, lr, self.generator, seed, lora_scaling)
        self.parts: dict[int, ServerPart] = {}
        self.optimizers: dict[int, torch.optim.Optimizer | None] = {}
        self.samples: dict[int, int] = {}
        self.tokens: dict[int, int] = {}
        self.probes: dict[int, ImportanceProbe] = {}
        self._measuring = False
        self._middle: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # U-shaped steps in flight
        self.lifecycle = "recreate"  # what adapters do across rounds (RoundPlan.adapters)
        self.dp = dp
        self.dpsgd: dict[int, DPSGD] = {}  # per client, under DP-SGD: its share of C and its own noise
        self._batch_sizes: dict[int, int] = {}  # of each client's step in flight

    adapter_name = staticmethod(adapter_name)

    def cut(self, client_id: int) -> Cut:
        """Client `client_id`'s cut: the one its client holds in one process, else this end's copy."""
        if client_id not in self.cuts:
            self.cuts[client_id] = Cut(self.compression)
        return self.cuts[client_id]

    def configure(self, plan: RoundPlan, part: ServerPart) -> None:
        """Client `plan.client_id`'s blocks after its cut, its adapters there (fresh, or kept and
        resized with their optimizer state, as `plan.adapters` says); zero its round counters."""
        cid = plan.client_id
        self.parts[cid] = part
        self.lifecycle = plan.adapters
        keep = plan.adapters != "recreate"
        self.holder.configure_adapters(part, adapter_name(cid), plan.ranks, plan.adapters)
        self.optimizers[cid] = self.holder.new_optimizer(part, adapter_name(cid),
                                                         self.optimizers.get(cid) if keep else None)  # fmt: skip
        self.samples[cid] = self.tokens[cid] = 0
        if self.dp.sgd:
            if cid not in self.dpsgd:
                generator = noise_generator(self.dp.seed, "server", cid)
                self.dpsgd[cid] = DPSGD(self.dp.sgd_sigma, self.dp.grad_clip, generator, self.dp.sgd_batches, hosts=2)
            self.dpsgd[cid].reset()  # a logical batch a lost round left half-done was never released
            self.dpsgd[cid].training = any(rank > 0 for rank in plan.ranks.values())
            keep_per_example([part], True)
        if self._measuring:
            self.probes[cid] = ImportanceProbe.for_part(part, self.holder.candidates)

    def measure_importance(self, enabled: bool) -> None:
        """Measure the server-side candidates on each client's batches."""
        self._measuring = enabled
        self.probes = {cid: ImportanceProbe.for_part(part, self.holder.candidates)
                       for cid, part in self.parts.items()} if enabled else {}  # fmt: skip

    def importance_report(self, client_id: int) -> tuple[dict[str, float], int]:
        probe = self.probes.get(client_id)
        return probe.report() if probe is not None else ({}, 0)

    def parameters(self, client_id: int) -> list[torch.nn.Parameter]:
        return self.holder.parameters(self.parts.get(client_id), adapter_name(client_id))

    def upload(self, client_id: int) -> AdapterUpload:
        samples = self.samples.get(client_id, 0)
        factors = self.holder.upload(self.parts[client_id], adapter_name(client_id), client_id, samples)
        return AdapterUpload(client_id, samples, factors)

    def apply_update(self, update: ModelUpdate, merge: bool = True, sampled: Sequence[int] | None = None) -> None:
        """Merge into every server-side block once (the parts of different clients share blocks),
        unless a shared copy already took it; then move the anchors of the persistent adapters of
        the clients that trained (`sampled`; None: all)."""
        if merge and self.parts:  # the part of the shallowest cut holds every server-side block
            self.holder.merge(min(self.parts.values(), key=lambda part: part.split_point), update)
        if self.lifecycle == "anchor":
            for cid, part in self.parts.items():
                if sampled is None or cid in sampled:
                    self.holder.advance_anchors(part, adapter_name(cid))

    def adapter_deltas(self, client_id: int) -> dict[str, torch.Tensor]:
        """What client `client_id`'s server-side adapters add to their weights, dense."""
        return self.holder.deltas(self.parts[client_id], adapter_name(client_id))

    def state_dict(self, adapters: bool = True) -> dict[str, torch.Tensor]:
        """At a round boundary: the random generator and, with `adapters`, every client's
        server-side adapters with anchors and optimizer state (`adapter/{client}/...`)."""
        tensors = {"rng": self.generator.get_state()}
        if adapters:
            for cid, part in self.parts.items():
                state = self.holder.adapter_state(part, adapter_name(cid), self.optimizers.get(cid))
                tensors.update({f"adapter/{cid}/{k}": v for k, v in state.items()})
        for cid, dpsgd in self.dpsgd.items():
            tensors.update({f"dp/{cid}/{k}": v for k, v in dpsgd.state().items()})
        return tensors

    def load_state_dict(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """The inverse of `state_dict`, after `configure` with the checkpointed round's plans."""
        for cid, part in self.parts.items():
            prefix = f"adapter/{cid}/"
            adapters = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
            if adapters:
                self.holder.load_adapter_state(part, adapter_name(cid), adapters, self.optimizers.get(cid))
        for cid, dpsgd in self.dpsgd.items():
            dpsgd.load_state({k[len(f"dp/{cid}/") :]: v for k, v in tensors.items() if k.startswith(f"dp/{cid}/")})
        self.generator.set_state(tensors["rng"])

    def apply_adapters(self, broadcast: AdapterBroadcast) -> None:
        for cid, part in self.parts.items():
            self.holder.overwrite(part, adapter_name(cid), broadcast)

    def step(self, message: Activations) -> ActivationGradient:
        """Finish the forward pass for one client, compute the loss, back-propagate, update that
        client's server-side adapters and return dL/dh."""
        cid = message.client_id
        if message.labels is None:
            raise RuntimeError(f"client {cid}'s activations carry no labels; a U-shaped step goes to forward_middle")
        hidden, output = self._forward(message)
        loss_sum, count = target_token_loss(output, message.labels.to(self.device))
        loss = loss_sum / max(count, 1)
        # Under DP-SGD each example's token losses summed over the batch size (see privacy/dp.py).
        (loss_sum / message.hidden.shape[0] if self.dp.sgd else loss).backward()
        self._finish(cid)
        return self.cut(cid).send(ActivationGradient(cid, message.step, hidden.grad, float(loss.detach()), count))

    def forward_middle(self, message: Activations) -> MiddleActivations:
        """U-shaped split: run the middle blocks on a client's activations and send the result back
        to the client, which finishes the forward pass and computes the loss."""
        cid = message.client_id
        hidden, output = self._forward(message)
        self._middle[cid] = (message.step, hidden, output)
        return self.cut(cid).send(MiddleActivations(cid, message.step, output))

    def backward_middle(self, message: TailGradient) -> ActivationGradient:
        """U-shaped split: back-propagate the client's dL/dh through the middle, update that client's
        server-side adapters and return dL/dh at the first cut."""
        cid = message.client_id
        step, hidden, output = self._middle.get(cid, (None, None, None))
        if step != message.step:
            raise RuntimeError(f"the main server got a tail gradient for client {cid}'s step {message.step}, "
                               "whose middle it did not run")  # fmt: skip
        del self._middle[cid]
        gradient = self.cut(cid).receive(message, output.dtype, self.device)
        if output.requires_grad:
            output.backward(gradient)
        self._finish(cid)
        grad = hidden.grad if hidden.grad is not None else torch.zeros_like(hidden)
        return self.cut(cid).send(ActivationGradient(cid, message.step, grad, None, 0))

    def _forward(self, message: Activations) -> tuple[torch.Tensor, torch.Tensor]:
        cid = message.client_id
        part = self.parts[cid]
        if cid in self.dpsgd:  # a step abandoned half-way left its records
            drop_records([part], adapter_name(cid))
        set_active_adapter(part, adapter_name(cid))
        hidden = self.cut(cid).receive(message, weights_dtype(part), self.device).detach().requires_grad_(True)
        probe = self.probes.get(cid)
        if probe is not None:
            probe.start()
        self.samples[cid] = self.samples.get(cid, 0) + message.hidden.shape[0]
        self._batch_sizes[cid] = message.hidden.shape[0]
        self.tokens[cid] = self.tokens.get(cid, 0) + int(message.attention_mask.sum())
        return hidden, part(hidden, message.attention_mask.to(self.device))

    def _finish(self, cid: int) -> None:
        """After a backward pass: read the importance gates, step this client's optimizer."""
        probe = self.probes.get(cid)
        if probe is not None:
            probe.collect()
        if cid in self.dpsgd and not self.dpsgd[cid].privatize([self.parts[cid]], adapter_name(cid),
                                                                self._batch_sizes[cid]):  # fmt: skip
            return  # the batch is in the logical batch's sum (its gradients cleared); no update yet
        optimizer = self.optimizers.get(cid)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    # -- validation: the same split graph as training, without gradients ---------------------------
    @torch.no_grad()
    def validation_loss(self, message: Activations, adapter: str | None) -> tuple[float, int]:
        """The rest of the model and the loss on a client's validation activations."""
        logits = self._validation_run(message, adapter)
        total, count = target_token_loss(logits, message.labels.to(self.device))
        return float(total), count

    @torch.no_grad()
    def validation_middle(self, message: Activations, adapter: str | None) -> MiddleActivations:
        """U-shaped: the middle on a client's validation activations, back across the cut."""
        output = self._validation_run(message, adapter).cpu()
        return self.cut(message.client_id).send(MiddleActivations(message.client_id, message.step, output), True)

    def _validation_run(self, message: Activations, adapter: str | None) -> torch.Tensor:
        part = self.parts[message.client_id]
        set_active_adapter(part, adapter)
        hidden = self.cut(message.client_id).receive(message, weights_dtype(part), self.device, validation=True)
        return part(hidden, message.attention_mask.to(self.device))
