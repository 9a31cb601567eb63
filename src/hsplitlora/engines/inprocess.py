"""The in-process engine: every role is an object in this process and a message is a function
argument. Clients are logically parallel; the main server interleaves their steps. Clients and
the main server share the model's modules here, so a merge is applied once to the shared copy;
when the main server computes on another device it holds a copy of its own (`server_model`),
which takes every merge too."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hsplitlora.engines.traffic import TrafficLedger
from hsplitlora.evaluation.perplexity import evaluate_loss
from hsplitlora.lora.attach import Candidate, set_active_adapter
from hsplitlora.method.importance import warmup_sums
from hsplitlora.models.architectures import Architecture
from hsplitlora.models.split import ClientPart, ServerPart, client_part, server_part, weights_dtype
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
        server_model: torch.nn.Module | None = None,
    ):
        self.model = model
        self.server_model = server_model if server_model is not None else model
        self.arch = arch
        self.candidates = candidates
        self.clients = list(clients)
        self.server = server
        self.fed_server = fed_server or FedServer()
        self.start_ledger([c.client_id for c in self.clients])
        self.message_log: list | None = None  # a list here records every message of every split step

    def shutdown(self) -> None:
        """Nothing to release in one process."""

    def configure(self, plans: Sequence[RoundPlan], full_finetune_lr: float | None = None) -> None:
        """Give each client and the main server their parts for the round's cuts, and adapters.
        A split point of L (every block) means no split: the client also holds the head. With a
        plan's `tail_blocks` t the split is U-shaped: the server runs blocks [s, L - t) only."""
        num_blocks = self.arch.num_blocks(self.model)
        for plan, client in zip(plans, self.clients, strict=True):
            if plan.split_point >= num_blocks:
                head = ServerPart(self.arch, self.model, num_blocks)
                part = ClientPart(self.arch, self.model, plan.split_point)
                client.configure(plan, part, head=head, full_finetune_lr=full_finetune_lr)
                continue
            client.configure(plan, client_part(self.arch, self.model, plan.split_point, plan.tail_blocks))
            part = server_part(self.arch, self.server_model, plan.split_point, plan.tail_blocks)
            self.server.configure(plan, part)

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
            for client in self.clients:  # the shared copy took dW; each role moves its anchors
                client.apply_update(result, merge=False)
            self.server.apply_update(result, merge=False)
        else:
            for client in self.clients:
                client.apply_adapters(result)
            self.server.apply_adapters(result)
        return result

    @torch.no_grad()
    def _merge_once(self, update: ModelUpdate) -> None:
        # Every client and the main server hold the very same tensors here: merge each once (per copy).
        for name, delta in update.deltas.items():
            candidate = self.candidates[name]
            dense = delta if isinstance(delta, torch.Tensor) else delta.dense()
            for model in self._copies():
                model.get_submodule(candidate.module).merge(candidate.slot, dense)

    def _copies(self) -> list[torch.nn.Module]:
        return [self.model] if self.server_model is self.model else [self.model, self.server_model]

    # -- what the round loop needs from the roles, without reaching into them ------------------------
    def warmup_importance(self) -> list[tuple[dict[str, float], int]]:
        """Per client: sum_j w_j dL/dw_j over one of its batches on the frozen model (round 1's
        importance, before any training; equal to what client and main server would measure)."""
        return [warmup_sums(self.model, self.candidates, [next(client.batches).to(client.device)])
                for client in self.clients]  # fmt: skip

    def round_counters(self) -> list[dict[str, int]]:
        return [{"samples": client.samples, "tokens": client.tokens} for client in self.clients]

    def validation_loss(self, batches: Sequence, client_id: int | None) -> float:
        """Mean target-token loss of the current model: merged weights, plus client `client_id`'s
        adapters for strategies whose adapters carry the update (None: merged weights only)."""
        adapter = None if client_id is None else self.clients[client_id].adapter
        split = client_id is not None and self.server_model is not self.model and not self.clients[client_id].local
        # With a main server copy of its own, its adapters of this client live there: run the split.
        loss, _ = evaluate_loss(self._split_forward(client_id) if split else self.forward_with(adapter), batches)
        return loss

    def _split_forward(self, client_id: int) -> Callable:
        client, part = self.clients[client_id], self.server.parts[client_id]
        adapter = client.adapter

        def forward(batch):
            batch = batch.to(client.device)
            set_active_adapter(client.part, adapter)
            set_active_adapter(part, adapter)
            front = client.part.front if client.u_shaped else client.part
            hidden = front(batch.input_ids, batch.attention_mask)
            out = part(hidden.to(self.server.device, weights_dtype(part)), batch.attention_mask.to(self.server.device))
            if client.u_shaped:
                out = client.part.tail(out.to(client.device, weights_dtype(client.part.tail)), batch.attention_mask)
            return out

        return forward

    def trained_weights(self, full_finetune: bool) -> dict[str, torch.Tensor]:
        """What training changed: every candidate's merged weight, or every weight under full FT."""
        if full_finetune:
            return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters() if "lora_" not in n}
        return {
            name: self.model.get_submodule(c.module).weight(c.slot).detach().to("cpu", copy=True).contiguous()
            for name, c in self.candidates.items()
        }

    def export_weights(self, client_id: int | None, full_finetune: bool) -> dict[str, torch.Tensor]:
        """The final model's trained weights, with client `client_id`'s adapters folded in."""
        final = self.trained_weights(full_finetune)
        if client_id is not None and not full_finetune:
            client = self.clients[client_id]
            deltas = client.adapter_deltas()
            if client.client_id in self.server.parts:
                deltas.update(self.server.adapter_deltas(client.client_id))
            for name, delta in deltas.items():
                final[name] = final[name] + delta
        return final

    def state(self, full_finetune: bool) -> tuple[dict, dict[str, torch.Tensor]]:
        """The roles' state at a round boundary (the checkpoint schema): weights, and each role's
        generator, batch order and adapters with their anchors and optimizer state; the fed
        server's held uploads."""
        tensors = {f"weight/{n}": w for n, w in self.trained_weights(full_finetune).items()}
        states = []
        for client in self.clients:
            state, role_tensors = client.state_dict(adapters=not full_finetune)
            states.append(state)
            tensors.update({f"client/{client.client_id}/{k}": v for k, v in role_tensors.items()})
        tensors.update({f"server/{k}": v for k, v in self.server.state_dict(not full_finetune).items()})
        tensors.update({f"fed/{k}": v for k, v in self.fed_server.state_dict().items()})
        return {"clients": states}, tensors

    @torch.no_grad()
    def load_state(
        self, state: dict, tensors: dict[str, torch.Tensor], plans: Sequence[RoundPlan],
        full_finetune_lr: float | None,
    ) -> None:  # fmt: skip
        """Undo `state`: the inverse, given the plan the checkpointed round ran with."""
        self.configure(plans, full_finetune_lr=full_finetune_lr)  # adapters need their parts and shapes
        for model in self._copies():
            if full_finetune_lr is not None:
                for name, param in model.named_parameters():
                    if f"weight/{name}" in tensors:
                        param.copy_(tensors[f"weight/{name}"])
            else:
                for name, c in self.candidates.items():
                    model.get_submodule(c.module).weight(c.slot).copy_(tensors[f"weight/{name}"])
        for client, client_state in zip(self.clients, state["clients"], strict=True):
            client.load_state_dict(client_state, role_tensors(tensors, f"client/{client.client_id}/"))
        self.server.load_state_dict(role_tensors(tensors, "server/"))
        self.fed_server.load_state_dict(role_tensors(tensors, "fed/"))

    def forward_with(self, adapter: str | None) -> Callable:
        """The whole model's logits with one client's adapters active (None: merged weights only)."""

        device = next(self.model.parameters()).device

        def forward(batch):
            set_active_adapter(self.model, adapter)
            batch = batch.to(device)
            return self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

        return forward


def role_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one role in a checkpoint, without its prefix."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
