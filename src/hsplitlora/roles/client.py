"""A client: its private data, the first `split_point` blocks, its own adapters and optimizer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from hsplitlora.compression import pack
from hsplitlora.data.e2e import Batch
from hsplitlora.lora.attach import Candidate, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.method.aggregation import AdapterFactors
from hsplitlora.method.importance import ImportanceProbe, candidate_layers
from hsplitlora.models.split import ClientPart, UClientPart
from hsplitlora.roles.messages import (
    ActivationGradient,
    Activations,
    AdapterBroadcast,
    AdapterUpload,
    MiddleActivations,
    ModelUpdate,
    RoundPlan,
    StepRecord,
    TailGradient,
)


def adapter_name(client_id: int) -> str:
    return f"client{client_id}"


class AdapterHolder:
    """What a client and the main server share: adapters on the candidates of the blocks they
    run for one client, re-created, uploaded, merged or overwritten by aggregation results."""

    def __init__(self, candidates: Mapping[str, Candidate], alpha: float, lr: float, generator: torch.Generator):
        self.candidates = dict(candidates)
        self.alpha = alpha
        self.lr = lr
        self.generator = generator

    def _layers(self, part: torch.nn.Module) -> dict:
        return candidate_layers(part, self.candidates)

    def create_adapters(self, part: torch.nn.Module, name: str, ranks: Mapping[str, int]) -> None:
        for candidate, layer in self._layers(part).items():
            layer.set_adapter(
                name, self.candidates[candidate].slot, ranks.get(candidate, 0), self.alpha, self.generator
            )

    def parameters(self, part: torch.nn.Module | None, name: str) -> list[torch.nn.Parameter]:
        if part is None:
            return []
        unique = {id(layer): layer for layer in self._layers(part).values()}  # q, k, v share GPT-2's c_attn
        return [p for layer in unique.values() for p in layer.adapter_parameters(name)]

    def new_optimizer(self, part: torch.nn.Module | None, name: str) -> torch.optim.Optimizer | None:
        params = self.parameters(part, name)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0) if params else None

    def factors(self, part: torch.nn.Module, name: str, client_id: int, samples: int) -> dict[str, AdapterFactors]:
        out = {}
        for candidate, layer in self._layers(part).items():
            found = layer.factors(name, self.candidates[candidate].slot)
            if found is not None:
                a, b, scale = found
                out[candidate] = AdapterFactors(client_id, samples, a.detach().clone(), b.detach().clone(), scale)
        return out

    @torch.no_grad()
    def merge(self, part: torch.nn.Module, update: ModelUpdate) -> None:
        for candidate, layer in self._layers(part).items():
            delta = update.deltas.get(candidate)
            if delta is not None:
                layer.merge(
                    self.candidates[candidate].slot, delta if isinstance(delta, torch.Tensor) else delta.dense()
                )

    @torch.no_grad()
    def overwrite(self, part: torch.nn.Module, name: str, broadcast: AdapterBroadcast) -> None:
        """Take the aggregated adapters, truncated to this holder's own rank of each."""
        for candidate, layer in self._layers(part).items():
            slot = self.candidates[candidate].slot
            found = layer.factors(name, slot)
            if found is None or candidate not in broadcast.factors:
                continue
            a, b, scale = found
            avg_a, avg_scaled_b = broadcast.factors[candidate]
            rank = a.shape[0]
            a.copy_(avg_a[:rank])
            b.copy_(avg_scaled_b[:, :rank] / scale)


class _PendingStep:
    """A split step between the client's forward and its last backward."""

    def __init__(self, step: int, hidden: torch.Tensor, batch: Batch, sent: int):
        self.step = step
        self.hidden = hidden
        self.batch = batch
        self.traffic = {"activations": sent}
        self.loss: float | None = None


class Client:
    """The first `split_point` blocks (and, in a U-shaped split, the last blocks, head and loss)
    of the model, this client's private batches, adapters and optimizer."""

    def __init__(
        self,
        client_id: int,
        batches: Iterator[Batch],
        candidates: Mapping[str, Candidate],
        lr: float,
        alpha: float = 16.0,
        seed: int = 0,
        compression: str = "fp32",
    ):
        self.client_id = client_id
        self.compression = compression  # of the activations this client sends
        self.adapter = adapter_name(client_id)
        self.batches = batches
        self.lr = lr
        self.generator = torch.Generator().manual_seed(seed * 100_003 + client_id)
        self.holder = AdapterHolder(candidates, alpha, lr, self.generator)
        self.part: ClientPart | UClientPart | None = None
        self.head: torch.nn.Module | None = None
        self.step = 0
        self.samples = 0  # trained this round
        self.tokens = 0  # processed this round
        self._pending: _PendingStep | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.probe: ImportanceProbe | None = None
        self._measuring = False

    @property
    def split_point(self) -> int:
        return self.part.split_point

    # -- round life cycle -----------------------------------------------------------------------
    def configure(
        self,
        plan: RoundPlan,
        part: ClientPart | UClientPart,
        fresh: bool = True,
        head: torch.nn.Module | None = None,
        full_finetune_lr: float | None = None,
    ) -> None:
        """Take the round's cut and ranks: (re)create this client's adapters fresh (or keep the
        persisting ones), a fresh optimizer, and zero the round's counters. With a `head` the
        client runs the whole model and computes its loss itself (the baselines without split);
        with `full_finetune_lr` it trains every weight instead of adapters (centralised FT)."""
        self.part = part
        self.head = head
        if fresh:
            self.holder.create_adapters(part, self.adapter, plan.ranks)
        if full_finetune_lr is not None:
            weights = list({id(p): p for m in (part, head) for p in m.parameters()}.values())
            for weight in weights:
                weight.requires_grad_(True)
            self.optimizer = torch.optim.AdamW(weights, lr=full_finetune_lr, weight_decay=0.0)
        else:
            self.optimizer = self.holder.new_optimizer(part, self.adapter)
        self.samples = self.tokens = 0
        self.probe = ImportanceProbe.for_part(part, self.holder.candidates) if self._measuring else None

    def measure_importance(self, enabled: bool) -> None:
        """Measure sum_j w_j dL/dw_j of the candidates in this client's blocks during its steps."""
        self._measuring = enabled
        self.probe = ImportanceProbe.for_part(self.part, self.holder.candidates) if enabled and self.part else None

    def importance_report(self) -> tuple[dict[str, float], int]:
        return self.probe.report() if self.probe is not None else ({}, 0)

    def parameters(self) -> list[torch.nn.Parameter]:
        """This client's trainable parameters: its adapters on the blocks it runs."""
        return self.holder.parameters(self.part, self.adapter)

    def reset_optimizer(self) -> None:
        self.optimizer = self.holder.new_optimizer(self.part, self.adapter)

    def upload(self) -> AdapterUpload:
        return AdapterUpload(self.client_id, self.samples,
                             self.holder.factors(self.part, self.adapter, self.client_id, self.samples))  # fmt: skip

    def apply_update(self, update: ModelUpdate) -> None:
        self.holder.merge(self.part, update)

    def apply_adapters(self, broadcast: AdapterBroadcast) -> None:
        self.holder.overwrite(self.part, self.adapter, broadcast)

    @property
    def u_shaped(self) -> bool:
        """Whether this client also runs the model's last blocks, its head and the loss."""
        return isinstance(self.part, UClientPart)

    @property
    def local(self) -> bool:
        """Whether this client runs the whole model and its loss (no split)."""
        return self.head is not None

    def local_step(self) -> float:
        """A whole-model step on the client: forward, loss, backward, update. Nothing is sent."""
        batch = next(self.batches)
        set_active_adapter(self.part, self.adapter)
        set_active_adapter(self.head, self.adapter)
        logits = self.head(self.part(batch.input_ids, batch.attention_mask), batch.attention_mask)
        total, count = target_token_loss(logits, batch.labels)
        loss = total / max(count, 1)
        loss.backward()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.samples += batch.input_ids.shape[0]
        self.tokens += int(batch.attention_mask.sum())
        self.step += 1
        return float(loss.detach())

    # -- one split step -------------------------------------------------------------------------
    def forward(self) -> Activations:
        """Run the client part (the front, in a U-shaped split) on the next private batch; keep the
        graph for `backward`. In a U-shaped split the labels stay here."""
        batch = next(self.batches)
        set_active_adapter(self.part, self.adapter)
        if self.probe is not None:
            self.probe.start()
        front = self.part.front if self.u_shaped else self.part
        hidden = front(batch.input_ids, batch.attention_mask)
        self.samples += batch.input_ids.shape[0]
        self.tokens += int(batch.attention_mask.sum())
        labels = None if self.u_shaped else batch.labels
        message = Activations(self.client_id, self.step, pack(hidden, self.compression), batch.attention_mask, labels)
        self._pending = _PendingStep(self.step, hidden, batch, message.nbytes())
        return message

    def _expect(self, message) -> _PendingStep:
        pending = self._pending
        if pending is None or message.step != pending.step or message.client_id != self.client_id:
            kind = type(message).__name__
            raise RuntimeError(f"client {self.client_id} got {kind} for step {message.step}, which it is not at")
        return pending

    def tail_step(self, message: MiddleActivations) -> TailGradient:
        """U-shaped split: run the tail (last blocks, head) on the middle's activations, compute the
        loss here, back-propagate through the tail and return dL/dh to the main server."""
        pending = self._expect(message)
        pending.traffic["activations_down"] = message.nbytes()
        hidden = message.hidden.unpack().detach().requires_grad_(True)
        logits = self.part.tail(hidden, pending.batch.attention_mask)
        total, count = target_token_loss(logits, pending.batch.labels)
        loss = total / max(count, 1)
        loss.backward()
        pending.loss = float(loss.detach())
        reply = TailGradient(self.client_id, pending.step, pack(hidden.grad, self.compression))
        pending.traffic["gradients_up"] = reply.nbytes()
        return reply

    def backward(self, message: ActivationGradient) -> StepRecord:
        """Back-propagate the server's dL/dh through the client part (the front) and update the
        adapters; returns the step's loss and the bytes that crossed the cut."""
        pending = self._expect(message)
        if self.u_shaped and pending.loss is None:
            raise RuntimeError(f"client {self.client_id} got the front's gradient before running its tail")
        self._pending = None
        pending.traffic["gradients"] = message.nbytes()
        if pending.hidden.requires_grad:  # nothing to back-propagate without adapters or a probe
            pending.hidden.backward(message.grad.unpack())
        if self.probe is not None:
            self.probe.collect()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepRecord(pending.loss if self.u_shaped else message.loss, pending.traffic)
