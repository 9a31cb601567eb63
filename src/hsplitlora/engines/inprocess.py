"""The in-process engine: every role is an object in this process and a message is a function
argument. Clients are logically parallel; the main server interleaves their steps. Clients and
the main server share the model's modules here, so a merge is applied once to the shared copy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hsplitlora.lora.attach import Candidate, set_active_adapter
from hsplitlora.models.architectures import Architecture
from hsplitlora.models.split import ClientPart, ServerPart
from hsplitlora.roles.client import Client
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import ActivationGradient, AdapterBroadcast, ModelUpdate, RoundPlan

TRAFFIC = ("activations", "gradients", "adapters_up", "adapters_down")


class InProcessEngine:
    def __init__(
        self,
        model: torch.nn.Module,
        arch: Architecture,
        candidates: dict[str, Candidate],
        clients: Sequence[Client],
        server: MainServer,
        fed_server: FedServer | None = None,
    ):
        self.model = model
        self.arch = arch
        self.candidates = candidates
        self.clients = list(clients)
        self.server = server
        self.fed_server = fed_server or FedServer()
        self.traffic = {c.client_id: dict.fromkeys(TRAFFIC, 0) for c in self.clients}

    @property
    def bytes_up(self) -> dict[int, int]:
        return {cid: t["activations"] + t["adapters_up"] for cid, t in self.traffic.items()}

    @property
    def bytes_down(self) -> dict[int, int]:
        return {cid: t["gradients"] + t["adapters_down"] for cid, t in self.traffic.items()}

    def reset_traffic(self) -> None:
        self.traffic = {c.client_id: dict.fromkeys(TRAFFIC, 0) for c in self.clients}

    def configure(self, plans: Sequence[RoundPlan], fresh: bool = True, full_finetune_lr: float | None = None) -> None:
        """Give each client and the main server their parts for the round's cuts, and adapters.
        A split point of L (every block) means no split: the client also holds the head."""
        num_blocks = self.arch.num_blocks(self.model)
        for plan, client in zip(plans, self.clients, strict=True):
            part = ClientPart(self.arch, self.model, plan.split_point)
            if plan.split_point >= num_blocks:
                head = ServerPart(self.arch, self.model, num_blocks)
                client.configure(plan, part, fresh, head=head, full_finetune_lr=full_finetune_lr)
            else:
                client.configure(plan, part, fresh)
                self.server.configure(plan, ServerPart(self.arch, self.model, plan.split_point), fresh)

    def measure_importance(self, enabled: bool) -> None:
        for client in self.clients:
            client.measure_importance(enabled)
        self.server.measure_importance(enabled)

    def split_step(self, client: Client) -> ActivationGradient:
        """One split step: client forward -> activations -> server forward, loss, backward and
        update -> activation gradient -> client backward and update."""
        activations = client.forward()
        self.traffic[client.client_id]["activations"] += activations.nbytes()
        gradient = self.server.step(activations)
        self.traffic[client.client_id]["gradients"] += gradient.nbytes()
        client.backward(gradient)
        return gradient

    def step_all(self) -> list[float]:
        """One local step of every client (split ones interleaved on the main server); losses."""
        return [client.local_step() if client.local else self.split_step(client).loss for client in self.clients]

    def local_steps(self, steps: int, on_step: Callable[[int, list[float]], None] | None = None) -> list[list[float]]:
        history = []
        for step in range(steps):
            losses = self.step_all()
            history.append(losses)
            if on_step is not None:
                on_step(step, losses)
        return history

    def importance_reports(self) -> list[tuple[dict[str, float], int, int]]:
        """Per client: (sum_j w_j dL/dw_j per candidate over its batches, batches, samples)."""
        reports = []
        for client in self.clients:
            client_sums, batches = client.importance_report()
            server_sums, _ = ({}, 0) if client.local else self.server.importance_report(client.client_id)
            reports.append(({**client_sums, **server_sums}, batches, client.samples))
        return reports

    def aggregate(self, round_: int) -> ModelUpdate | AdapterBroadcast:
        """Uploads to the fed server, its update back to every holder."""
        uploads = []
        for client in self.clients:
            upload = client.upload()
            self.traffic[client.client_id]["adapters_up"] += upload.nbytes()
            uploads.append(upload)
            if not client.local:
                uploads.append(self.server.upload(client.client_id))
        result = self.fed_server.aggregate(round_, uploads)
        for client in self.clients:
            names = {n for n, c in self.candidates.items() if c.block < client.split_point}
            self.traffic[client.client_id]["adapters_down"] += result.nbytes(names)
        if isinstance(result, ModelUpdate):
            self._merge_once(result)
        else:
            for client in self.clients:
                client.apply_adapters(result)
            self.server.apply_adapters(result)
        return result

    @torch.no_grad()
    def _merge_once(self, update: ModelUpdate) -> None:
        # Every client and the main server hold the very same tensors here: merge each once.
        for name, delta in update.deltas.items():
            candidate = self.candidates[name]
            layer = self.model.get_submodule(candidate.module)
            layer.merge(candidate.slot, delta if isinstance(delta, torch.Tensor) else delta.dense())

    def forward_with(self, adapter: str | None) -> Callable:
        """The whole model's logits with one client's adapters active (None: merged weights only)."""

        def forward(batch):
            set_active_adapter(self.model, adapter)
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

        return forward
