"""The in-process engine: every role is an object in this process and a message is a function
argument. Clients are logically parallel; the main server interleaves their steps. Clients and
the main server share the model's modules here, so a merge is applied once to the shared copy."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hsplitlora.engines.traffic import TrafficLedger
from hsplitlora.evaluation.perplexity import evaluate_loss
from hsplitlora.lora.attach import Candidate, set_active_adapter
from hsplitlora.method.importance import candidate_layers, warmup_sums
from hsplitlora.models.architectures import Architecture
from hsplitlora.models.split import ClientPart, ServerPart, client_part, server_part
from hsplitlora.roles.client import Client
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import AdapterBroadcast, ModelUpdate, RoundPlan


class InProcessEngine(TrafficLedger):
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
        self.start_ledger([c.client_id for c in self.clients])
        self.message_log: list | None = None  # a list here records every message of every split step

    def shutdown(self) -> None:
        """Nothing to release in one process."""

    def configure(self, plans: Sequence[RoundPlan], fresh: bool = True, full_finetune_lr: float | None = None) -> None:
        """Give each client and the main server their parts for the round's cuts, and adapters.
        A split point of L (every block) means no split: the client also holds the head. With a
        plan's `tail_blocks` t the split is U-shaped: the server runs blocks [s, L - t) only."""
        num_blocks = self.arch.num_blocks(self.model)
        for plan, client in zip(plans, self.clients, strict=True):
            if plan.split_point >= num_blocks:
                head = ServerPart(self.arch, self.model, num_blocks)
                part = ClientPart(self.arch, self.model, plan.split_point)
                client.configure(plan, part, fresh, head=head, full_finetune_lr=full_finetune_lr)
                continue
            client.configure(plan, client_part(self.arch, self.model, plan.split_point, plan.tail_blocks), fresh)
            part = server_part(self.arch, self.model, plan.split_point, plan.tail_blocks)
            self.server.configure(plan, part, fresh)

    def measure_importance(self, enabled: bool) -> None:
        for client in self.clients:
            client.measure_importance(enabled)
        self.server.measure_importance(enabled)

    def _cross(self, message):
        """A message crossing between client and main server (kept when `message_log` is a list)."""
        if self.message_log is not None:
            self.message_log.append(message)
        return message

    def split_step(self, client: Client) -> float | None:
        """One split step: client forward -> activations -> server forward, loss, backward and
        update -> activation gradient -> client backward and update. U-shaped: client front ->
        activations -> server middle -> its activations -> client tail, loss, backward -> their
        gradient -> server backward -> activation gradient -> client front backward. The loss."""
        activations = self._cross(client.forward())
        if client.u_shaped:
            middle = self._cross(self.server.forward_middle(activations))
            tail_gradient = self._cross(client.tail_step(middle))
            gradient = self._cross(self.server.backward_middle(tail_gradient))
        else:
            gradient = self._cross(self.server.step(activations))
        record = client.backward(gradient)
        self.add_traffic(client.client_id, record.traffic)
        return record.loss

    def step_all(self) -> list[float]:
        """One local step of every client (split ones interleaved on the main server); losses."""
        return [client.local_step() if client.local else self.split_step(client) for client in self.clients]

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
            held = set(client.part.block_indices)
            names = {n for n, c in self.candidates.items() if c.block in held}
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

    # -- what the round loop needs from the roles, without reaching into them ------------------------
    def warmup_importance(self) -> list[tuple[dict[str, float], int]]:
        """Per client: sum_j w_j dL/dw_j over one of its batches on the frozen model (round 1's
        importance, before any training; equal to what client and main server would measure)."""
        return [warmup_sums(self.model, self.candidates, [next(client.batches)]) for client in self.clients]

    def round_counters(self) -> list[dict[str, int]]:
        return [{"samples": client.samples, "tokens": client.tokens} for client in self.clients]

    def validation_loss(self, batches: Sequence, persistent_adapters: bool) -> float:
        """Mean target-token loss of the current model: merged weights, plus the shared adapters
        for strategies whose adapters persist (all clients hold the same ones after a round)."""
        adapter = self.clients[0].adapter if persistent_adapters else None
        loss, _ = evaluate_loss(self.forward_with(adapter), batches)
        return loss

    def trained_weights(self, full_finetune: bool) -> dict[str, torch.Tensor]:
        """What training changed: every candidate's merged weight, or every weight under full FT."""
        if full_finetune:
            return {n: p.detach().clone() for n, p in self.model.named_parameters() if "lora_" not in n}
        return {
            name: self.model.get_submodule(c.module).weight(c.slot).detach().clone().contiguous()
            for name, c in self.candidates.items()
        }

    def export_weights(self, persistent_adapters: bool, full_finetune: bool) -> dict[str, torch.Tensor]:
        """The final model's trained weights, persisting adapters folded in."""
        final = self.trained_weights(full_finetune)
        if persistent_adapters and not full_finetune:
            adapter = self.clients[0].adapter
            for name, c in self.candidates.items():
                layer = self.model.get_submodule(c.module)
                if layer.factors(adapter, c.slot) is not None:
                    final[name] = final[name] + layer.delta(adapter, c.slot).detach()
        return final

    def _adapter_parts(self, client: Client) -> list[tuple[str, torch.nn.Module]]:
        parts = [("client", client.part)]
        if client.client_id in self.server.parts:
            parts.append(("server", self.server.parts[client.client_id]))
        return parts

    def state(self, persistent_adapters: bool, full_finetune: bool) -> tuple[dict, dict[str, torch.Tensor]]:
        """The roles' state at a round boundary: weights, random generators, batch order and, for
        strategies whose adapters persist, every adapter (optimizer state is reset every round)."""
        tensors = {f"weight/{n}": w for n, w in self.trained_weights(full_finetune).items()}
        for client in self.clients:
            tensors[f"rng/{client.adapter}"] = client.generator.get_state()
        tensors["rng/server"] = self.server.generator.get_state()
        if persistent_adapters and not full_finetune:
            for client in self.clients:
                for role, part in self._adapter_parts(client):
                    for name, factors in client.holder.factors(part, client.adapter, client.client_id, 0).items():
                        tensors[f"adapter/{role}/{client.adapter}/{name}/A"] = factors.a
                        tensors[f"adapter/{role}/{client.adapter}/{name}/B"] = factors.b
        state = {"batchers": [c.batches.state() for c in self.clients], "client_steps": [c.step for c in self.clients]}
        return state, tensors

    @torch.no_grad()
    def load_state(
        self, state: dict, tensors: dict[str, torch.Tensor], plans: Sequence[RoundPlan], persistent_adapters: bool,
        full_finetune_lr: float | None,
    ) -> None:  # fmt: skip
        """Undo `state`: the inverse, given the plan the checkpointed round ran with."""
        if persistent_adapters:  # kept adapters need their parts and shapes first
            self.configure(plans, full_finetune_lr=full_finetune_lr)
            if full_finetune_lr is None:
                for client in self.clients:
                    for role, part in self._adapter_parts(client):
                        for name, layer in candidate_layers(part, self.candidates).items():
                            found = layer.factors(client.adapter, self.candidates[name].slot)
                            if found is not None:
                                found[0].copy_(tensors[f"adapter/{role}/{client.adapter}/{name}/A"])
                                found[1].copy_(tensors[f"adapter/{role}/{client.adapter}/{name}/B"])
        if full_finetune_lr is not None:
            for name, param in self.model.named_parameters():
                if f"weight/{name}" in tensors:
                    param.copy_(tensors[f"weight/{name}"])
        else:
            for name, c in self.candidates.items():
                self.model.get_submodule(c.module).weight(c.slot).copy_(tensors[f"weight/{name}"])
        for client, batcher_state, step in zip(self.clients, state["batchers"], state["client_steps"], strict=True):
            client.batches.load_state(batcher_state)
            client.generator.set_state(tensors[f"rng/{client.adapter}"])
            client.step = step
        self.server.generator.set_state(tensors["rng/server"])

    def forward_with(self, adapter: str | None) -> Callable:
        """The whole model's logits with one client's adapters active (None: merged weights only)."""

        def forward(batch):
            set_active_adapter(self.model, adapter)
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

        return forward
