"""A client: its private data, the first `split_point` blocks, its own adapters and optimizer."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from hsplitlora.data.e2e import Batch
from hsplitlora.lora.attach import Candidate, lora_layers, set_active_adapter
from hsplitlora.method.importance import ImportanceProbe
from hsplitlora.models.split import ClientPart
from hsplitlora.roles.messages import ActivationGradient, Activations


class Client:
    def __init__(
        self,
        client_id: int,
        part: ClientPart,
        batches: Iterator[Batch],
        lr: float,
    ):
        self.client_id = client_id
        self.adapter = f"client{client_id}"
        self.part = part
        self.batches = batches
        self.lr = lr
        self.step = 0
        self._pending: tuple[int, torch.Tensor] | None = None
        self.optimizer = self._new_optimizer()
        self.probe: ImportanceProbe | None = None

    def measure_importance(self, candidates: Mapping[str, Candidate] | None) -> None:
        """Measure sum_j w_j dL/dw_j of the candidates in this client's blocks during its steps
        (None: stop measuring)."""
        self.probe = None if candidates is None else ImportanceProbe.for_part(self.part, candidates)

    def importance_report(self) -> tuple[dict[str, float], int]:
        return self.probe.report() if self.probe is not None else ({}, 0)

    @property
    def split_point(self) -> int:
        return self.part.split_point

    def parameters(self) -> list[torch.nn.Parameter]:
        """This client's trainable parameters: its adapters on the blocks it runs."""
        return [p for layer in lora_layers(self.part) for p in layer.adapter_parameters(self.adapter)]

    def _new_optimizer(self) -> torch.optim.Optimizer | None:
        params = self.parameters()
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0) if params else None

    def reset_optimizer(self) -> None:
        """Fresh optimizer state, e.g. after adapters are re-created."""
        self.optimizer = self._new_optimizer()

    def forward(self) -> Activations:
        """Run the client part on the next private batch; keep the graph for `backward`."""
        batch = next(self.batches)
        set_active_adapter(self.part, self.adapter)
        if self.probe is not None:
            self.probe.start()
        hidden = self.part(batch.input_ids, batch.attention_mask)
        self._pending = (self.step, hidden)
        return Activations(self.client_id, self.step, hidden.detach(), batch.attention_mask, batch.labels)

    def backward(self, message: ActivationGradient) -> None:
        """Back-propagate the server's dL/dh through the client part and update the adapters."""
        if self._pending is None or message.step != self._pending[0] or message.client_id != self.client_id:
            raise RuntimeError(f"client {self.client_id} got a gradient for step {message.step} it did not send")
        _, hidden = self._pending
        self._pending = None
        if hidden.requires_grad:  # nothing to back-propagate without adapters or a probe
            hidden.backward(message.grad)
        if self.probe is not None:
            self.probe.collect()
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
