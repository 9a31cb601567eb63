"""The main server: the blocks after each client's cut, the head, and one adapter set and
optimizer per client."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hsplitlora.lora.attach import Candidate, lora_layers, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.method.importance import ImportanceProbe
from hsplitlora.models.split import ServerPart
from hsplitlora.roles.messages import ActivationGradient, Activations


class MainServer:
    def __init__(self, parts: dict[int, ServerPart], lr: float):
        self.parts = parts  # client id -> the server part for that client's split point
        self.lr = lr
        self.optimizers = {cid: self._new_optimizer(cid) for cid in parts}
        self.probes: dict[int, ImportanceProbe] = {}

    def measure_importance(self, candidates: Mapping[str, Candidate] | None) -> None:
        """Measure the server-side candidates on each client's batches (None: stop measuring)."""
        self.probes = {} if candidates is None else {
            cid: ImportanceProbe.for_part(part, candidates) for cid, part in self.parts.items()
        }  # fmt: skip

    def importance_report(self, client_id: int) -> tuple[dict[str, float], int]:
        probe = self.probes.get(client_id)
        return probe.report() if probe is not None else ({}, 0)

    @staticmethod
    def adapter_name(client_id: int) -> str:
        return f"client{client_id}"

    def parameters(self, client_id: int) -> list[torch.nn.Parameter]:
        name = self.adapter_name(client_id)
        return [p for layer in lora_layers(self.parts[client_id]) for p in layer.adapter_parameters(name)]

    def _new_optimizer(self, client_id: int) -> torch.optim.Optimizer | None:
        params = self.parameters(client_id)
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0) if params else None

    def reset_optimizer(self, client_id: int) -> None:
        self.optimizers[client_id] = self._new_optimizer(client_id)

    def step(self, message: Activations) -> ActivationGradient:
        """Finish the forward pass for one client, compute the loss, back-propagate, update that
        client's server-side adapters and return dL/dh."""
        part = self.parts[message.client_id]
        set_active_adapter(part, self.adapter_name(message.client_id))
        hidden = message.hidden.detach().requires_grad_(True)
        probe = self.probes.get(message.client_id)
        if probe is not None:
            probe.start()
        logits = part(hidden, message.attention_mask)
        loss_sum, count = target_token_loss(logits, message.labels)
        loss = loss_sum / max(count, 1)
        loss.backward()
        if probe is not None:
            probe.collect()
        optimizer = self.optimizers[message.client_id]
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return ActivationGradient(message.client_id, message.step, hidden.grad, float(loss.detach()), count)
