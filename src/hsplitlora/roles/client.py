"""A client: its private data, the first `split_point` blocks, its own adapters and optimizer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from hsplitlora.config import DEFAULT_COMPRESSION
from hsplitlora.data.e2e import Batch
from hsplitlora.lora.attach import Candidate, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.method.importance import ImportanceProbe
from hsplitlora.models.split import ClientPart, UClientPart, weights_dtype
from hsplitlora.privacy.dp import (
    DPSGD,
    NO_DP,
    ActivationNoise,
    DPSettings,
    LostRound,
    drop_records,
    keep_per_example,
    noise_generator,
)
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
    StepRecord,
    TailGradient,
)


class _PendingStep:
    """A split step between the client's forward and its last backward."""

    def __init__(self, step: int, hidden: torch.Tensor, batch: Batch):
        self.step = step
        self.hidden = hidden
        self.batch = batch
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
        compression: str = DEFAULT_COMPRESSION,
        device: torch.device | str = "cpu",
        warmup_batches: Iterator[Batch] | None = None,
        cut: Cut | None = None,
        dp: DPSettings = NO_DP,
        lora_scaling: str = "standard",
    ):
        self.client_id = client_id
        self.device = torch.device(device)  # where its part computes; batches are moved here
        self.cut = cut if cut is not None else Cut(compression)  # everything it sends and receives passes here
        self.adapter = adapter_name(client_id)
        self.batches = batches
        self.warmup_batches = warmup_batches  # the importance warm-up's own stream, over the same shard
        self.warming_up = False
        self.lr = lr
        self.generator = torch.Generator().manual_seed(seed * 100_003 + client_id)
        self.holder = AdapterHolder(candidates, alpha, lr, self.generator, seed, lora_scaling)
        self.part: ClientPart | UClientPart | None = None
        self.head: torch.nn.Module | None = None
        self.step = 0
        self.samples = 0  # trained this round
        self.tokens = 0  # processed this round
        self._pending: _PendingStep | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.lifecycle = "recreate"  # what this round's adapters do across rounds (RoundPlan.adapters)
        self.probe: ImportanceProbe | None = None
        self._measuring = False
        self.dp = dp
        self.activation_noise = None
        if dp.activations:  # on the sender's tensor, before compression
            generator = noise_generator(dp.seed, "activations", client_id)
            self.activation_noise = ActivationNoise(dp.activation_sigma, dp.activation_clip, generator)
            self.cut.add(self.activation_noise, wire=False)
        self.dpsgd = None
        if dp.sgd:
            self.dpsgd = DPSGD(
                dp.sgd_sigma, dp.grad_clip, noise_generator(dp.seed, "client", client_id), dp.sgd_batches
            )

    @property
    def split_point(self) -> int:
        return self.part.split_point

    # -- round life cycle -----------------------------------------------------------------------
    def configure(
        self,
        plan: RoundPlan,
        part: ClientPart | UClientPart,
        head: torch.nn.Module | None = None,
    ) -> None:
        """Take the round's cut and ranks: re-create this client's adapters fresh, or keep them
        (resized to the plan's ranks) with their optimizer state, as `plan.adapters` says; zero
        the round's counters. With a `head` the client runs the whole model and computes its loss
        itself (the baselines without split); with the plan's `full_finetune_lr` it trains every
        weight instead of adapters (centralised FT)."""
        self.part = part
        self.head = head
        self.lifecycle = plan.adapters
        keep = plan.adapters != "recreate"
        self.holder.configure_adapters(part, self.adapter, plan.ranks, plan.adapters)
        if plan.full_finetune_lr is not None:  # a fresh optimizer every round (its state is the model's size twice)
            weights = list({id(p): p for m in (part, head) for p in m.parameters()}.values())
            for weight in weights:
                weight.requires_grad_(True)
            self.optimizer = torch.optim.AdamW(weights, lr=plan.full_finetune_lr, weight_decay=0.0)
        else:
            self.optimizer = self.holder.new_optimizer(part, self.adapter, self.optimizer if keep else None)
        self.samples = self.tokens = 0
        self.probe = ImportanceProbe.for_part(part, self.holder.candidates) if self._measuring else None
        if self.dpsgd is not None:  # the client's share of C: all of it when it runs the whole model
            self.dpsgd.hosts = 1 if head is not None else 2
            self.dpsgd.training = any(rank > 0 for rank in plan.ranks.values())
            self.dpsgd.reset()  # a logical batch a lost round left half-done was never released
            keep_per_example([part, head], True)

    def measure_importance(self, enabled: bool) -> None:
        """Measure sum_j w_j dL/dw_j of the candidates in this client's blocks during its steps."""
        self._measuring = enabled
        self.probe = ImportanceProbe.for_part(self.part, self.holder.candidates) if enabled and self.part else None

    def importance_report(self) -> tuple[dict[str, float], int]:
        return self.probe.report() if self.probe is not None else ({}, 0)

    def warm_up(self, enabled: bool) -> None:
        """Draw the next steps' batches from the warm-up stream (not the training one)."""
        if enabled and self.warmup_batches is None:
            raise RuntimeError(f"client {self.client_id} was built without warm-up batches")
        self.warming_up = enabled

    def next_batch(self) -> Batch:
        """The next private batch, from the warm-up stream while warming up, on this client's device."""
        return next(self.warmup_batches if self.warming_up else self.batches).to(self.device)

    def parameters(self) -> list[torch.nn.Parameter]:
        """This client's trainable parameters: its adapters on the blocks it runs."""
        return self.holder.parameters(self.part, self.adapter)

    def upload(self) -> AdapterUpload:
        return AdapterUpload(self.client_id, self.samples,
                             self.holder.upload(self.part, self.adapter, self.client_id, self.samples))  # fmt: skip

    def apply_update(self, update: ModelUpdate, merge: bool = True, sampled: Sequence[int] | None = None) -> None:
        """Merge dW into the blocks this client holds (unless a shared copy already took it), then
        move the anchors of persistent adapters if this client trained (`sampled`; None: all): an
        unsampled client's factors still sit at their anchor, which the fed server holds."""
        if merge:
            self.holder.merge(self.part, update)
        if self.lifecycle == "anchor" and (sampled is None or self.client_id in sampled):
            self.holder.advance_anchors(self.part, self.adapter)

    def apply_adapters(self, broadcast: AdapterBroadcast) -> None:
        self.holder.overwrite(self.part, self.adapter, broadcast)

    def adapter_deltas(self) -> dict[str, torch.Tensor]:
        """What this client's adapters add to the weights they sit on, dense, per candidate."""
        return self.holder.deltas(self.part, self.adapter)

    def state_dict(self, adapters: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
        """At a round boundary: (batch order and step count, as JSON; the random generator and,
        with `adapters`, every adapter with its anchor and optimizer state, as flat tensors)."""
        tensors = {"rng": self.generator.get_state()}
        if self.activation_noise is not None:
            tensors.update({f"dp/activations/{k}": v for k, v in self.activation_noise.state().items()})
        if self.dpsgd is not None:
            tensors.update({f"dp/sgd/{k}": v for k, v in self.dpsgd.state().items()})
        if adapters and self.part is not None:
            state = self.holder.adapter_state(self.part, self.adapter, self.optimizer)
            tensors.update({f"adapter/{k}": v for k, v in state.items()})
        return {"batcher": self.batches.state(), "step": self.step}, tensors

    def load_state_dict(self, state: dict, tensors: Mapping[str, torch.Tensor]) -> None:
        """The inverse of `state_dict`, after `configure` with the checkpointed round's plan."""
        prefix = "adapter/"
        adapters = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if adapters:
            self.holder.load_adapter_state(self.part, self.adapter, adapters, self.optimizer)
        self.generator.set_state(tensors["rng"])
        if self.activation_noise is not None:
            prefix = "dp/activations/"
            self.activation_noise.load_state({k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)})
        if self.dpsgd is not None:
            self.dpsgd.load_state({k[len("dp/sgd/") :]: v for k, v in tensors.items() if k.startswith("dp/sgd/")})
        self.batches.load_state(state["batcher"])
        self.step = state["step"]
        if "lost" in state:  # a restart: the round it was lost in is not in the snapshot
            self._catch_up(LostRound.from_dict(state["lost"]))

    def _catch_up(self, lost: LostRound) -> None:
        """Count the batches sent to this client since its snapshot (an upper bound) and draw its
        noise from the restart's own stream from now on (privacy/dp.py, `LostRound`)."""
        if self.activation_noise is not None:
            self.activation_noise.steps += lost.steps
            self.activation_noise.generator = noise_generator(self.dp.seed, "activations", self.client_id, lost.stream)
        if self.dpsgd is not None:
            self.dpsgd.steps += lost.steps // self.dpsgd.batches
            self.dpsgd.generator = noise_generator(self.dp.seed, "client", self.client_id, lost.stream)

    @property
    def u_shaped(self) -> bool:
        """Whether this client also runs the model's last blocks, its head and the loss."""
        return isinstance(self.part, UClientPart)

    @property
    def front(self) -> ClientPart:
        """The blocks before the cut: the whole part, or its front in a U-shaped split."""
        return self.part.front if self.u_shaped else self.part

    @property
    def local(self) -> bool:
        """Whether this client runs the whole model and its loss (no split)."""
        return self.head is not None

    def local_step(self) -> float:
        """A whole-model step on the client: forward, loss, backward, update. Nothing is sent."""
        batch = self.next_batch()
        set_active_adapter(self.part, self.adapter)
        set_active_adapter(self.head, self.adapter)
        logits = self.head(self.part(batch.input_ids, batch.attention_mask), batch.attention_mask)
        total, count = target_token_loss(logits, batch.labels)
        loss = total / max(count, 1)
        self._backward_loss(total, loss, batch.input_ids.shape[0])
        self._step_optimizer(batch.input_ids.shape[0])
        self.samples += batch.input_ids.shape[0]
        self.tokens += int(batch.attention_mask.sum())
        self.step += 1
        return float(loss.detach())

    def private_steps(self) -> dict[str, int]:
        """Steps of each DP mechanism on this client's data so far (the accountant's counts)."""
        return {"dp_activation_steps": self.activation_noise.steps if self.activation_noise is not None else 0,
                "dp_sgd_steps": self.dpsgd.steps if self.dpsgd is not None else 0}  # fmt: skip

    def _backward_loss(self, total: torch.Tensor, mean: torch.Tensor, batch_size: int) -> None:
        """Back-propagate the batch's loss: its mean over target tokens, or under DP-SGD the sum of
        each example's token losses over the batch size (one example's gradient then depends on it
        alone)."""
        (total / batch_size if self.dpsgd is not None else mean).backward()

    def _step_optimizer(self, batch_size: int) -> None:
        """Update the adapters from this batch's gradients; under DP-SGD from their clipped, noised
        estimate, once its logical batch is complete."""
        if self.dpsgd is not None and not self.dpsgd.privatize([self.part, self.head], self.adapter, batch_size):
            return  # the batch is in the logical batch's sum; its gradients were cleared
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)

    # -- one split step -------------------------------------------------------------------------
    def forward(self) -> Activations:
        """Run the client part (the front, in a U-shaped split) on the next private batch; keep the
        graph for `backward`. In a U-shaped split the labels stay here."""
        if self.dpsgd is not None:  # a step abandoned half-way left its records
            drop_records([self.part, self.head], self.adapter)
        batch = self.next_batch()
        set_active_adapter(self.part, self.adapter)
        if self.probe is not None:
            self.probe.start()
        hidden = self.front(batch.input_ids, batch.attention_mask)
        self.samples += batch.input_ids.shape[0]
        self.tokens += int(batch.attention_mask.sum())
        labels = None if self.u_shaped else batch.labels
        self.cut.begin_step()
        message = self.cut.send(Activations(self.client_id, self.step, hidden, batch.attention_mask, labels))
        self._pending = _PendingStep(self.step, hidden, batch)
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
        hidden = self.cut.receive(message, weights_dtype(self.part.tail), self.device).detach().requires_grad_(True)
        logits = self.part.tail(hidden, pending.batch.attention_mask)
        total, count = target_token_loss(logits, pending.batch.labels)
        loss = total / max(count, 1)
        self._backward_loss(total, loss, pending.batch.input_ids.shape[0])
        pending.loss = float(loss.detach())
        return self.cut.send(TailGradient(self.client_id, pending.step, hidden.grad))

    def backward(self, message: ActivationGradient) -> StepRecord:
        """Back-propagate the server's dL/dh through the client part (the front) and update the
        adapters; returns the step's loss and the bytes that crossed the cut."""
        pending = self._expect(message)
        if self.u_shaped and pending.loss is None:
            raise RuntimeError(f"client {self.client_id} got the front's gradient before running its tail")
        self._pending = None
        gradient = self.cut.receive(message, pending.hidden.dtype, pending.hidden.device)
        if pending.hidden.requires_grad:  # nothing to back-propagate without adapters or a probe
            pending.hidden.backward(gradient)
        if self.probe is not None:
            self.probe.collect()
        self._step_optimizer(pending.batch.input_ids.shape[0])
        self.step += 1
        return StepRecord(pending.loss if self.u_shaped else message.loss, self.cut.take_counts())

    # -- validation: the same split graph as training, without gradients ---------------------------
    @torch.no_grad()
    def validation_forward(self, batch: Batch, adapter: str | None) -> Activations:
        """The front on a validation batch, across the cut (with the labels unless U-shaped)."""
        set_active_adapter(self.part, adapter)
        hidden = self.front(batch.input_ids.to(self.device), batch.attention_mask.to(self.device)).cpu()
        labels = None if self.u_shaped else batch.labels
        message = Activations(self.client_id, self.step, hidden, batch.attention_mask, labels)
        return self.cut.send(message, validation=True)

    @torch.no_grad()
    def validation_tail(self, message: MiddleActivations, batch: Batch, adapter: str | None) -> tuple[float, int]:
        """U-shaped: the tail, head and loss on the middle's activations (the labels stay here)."""
        hidden = self.cut.receive(message, weights_dtype(self.part.tail), self.device, validation=True)
        return self._validation_loss(self.part.tail, hidden, batch, adapter)

    @torch.no_grad()
    def validation_local(self, batch: Batch, adapter: str | None) -> tuple[float, int]:
        """No split: the whole model and its loss here; nothing crosses a cut."""
        set_active_adapter(self.part, adapter)
        hidden = self.front(batch.input_ids.to(self.device), batch.attention_mask.to(self.device))
        return self._validation_loss(self.head, hidden, batch, adapter)

    def _validation_loss(self, module, hidden, batch: Batch, adapter: str | None) -> tuple[float, int]:
        set_active_adapter(module, adapter)
        logits = module(hidden.to(self.device, weights_dtype(module)), batch.attention_mask.to(self.device))
        total, count = target_token_loss(logits, batch.labels.to(self.device))
        return float(total), count
