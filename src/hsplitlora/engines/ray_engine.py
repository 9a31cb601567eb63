"""The Ray engine: every client is a Ray actor holding only its data shard and its blocks (loaded
alone from the weights file), the main server an actor holding the blocks from the shallowest cut
on and the head; the fed server aggregates in the driver. The roles' code is the in-process one;
only the moving of messages differs. Activations, gradients, adapters and updates cross through
Ray's object store; nothing else is shared.

A client actor that dies during a round does not stop the run: the round completes with the
others (aggregation weights renormalise over them since only their uploads arrive), the event is
logged, and the client is restarted for the next round from the last aggregated weights of its
blocks (taken from the holders that kept them) and its batch order at the start of the round.

In a U-shaped split a client actor also loads the last t blocks, the final norm and the head, the
server actor only the middle blocks; a step chains five calls (front, middle, tail, middle's
backward, front's backward) through the object store.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hsplitlora.data.e2e import Batcher, Encoded
from hsplitlora.engines.inprocess import role_tensors
from hsplitlora.engines.traffic import TrafficLedger
from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import attach_lora, set_active_adapter
from hsplitlora.losses import target_token_loss
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import held_parameter_names, load_part, place
from hsplitlora.models.split import ClientPart, ServerPart, client_part, server_part, weights_dtype
from hsplitlora.roles.adapters import adapter_name
from hsplitlora.roles.client import Client
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import AdapterBroadcast, ModelUpdate, RoundPlan


class _Holder:
    """What both actor kinds share: a partial model with LoRA layers on its candidates."""

    def _load(self, spec: dict, blocks: Sequence[int], embedding: bool, head: bool, device: str = "cpu") -> None:
        torch.set_num_threads(spec.get("threads") or 1)
        loaded = load_part(spec["model"], blocks, embedding=embedding, head=head, seed=spec["seed"],
                           with_tokenizer=False, dtype=spec.get("dtype", "float32"))  # fmt: skip
        self.device = torch.device(device)
        self.model = place(loaded.model, self.device)  # the modules it does not hold stay on meta
        self.arch = architecture_of(self.model)
        self.num_blocks = self.arch.num_blocks(self.model)
        self.blocks = blocks
        candidates = attach_lora(self.model, spec["targets"])
        self.candidates = {n: c for n, c in candidates.items() if c.block in blocks}

    def held_parameter_names(self) -> list[str]:
        return held_parameter_names(self.model)

    def weights(self, names: Sequence[str], full: bool = False) -> dict[str, torch.Tensor]:
        if full:
            return {n: p.detach().to("cpu", copy=True) for n, p in self.model.named_parameters()
                    if "lora_" not in n and not p.is_meta and any(n.startswith(k) for k in names)}  # fmt: skip
        return {n: self.model.get_submodule(self.candidates[n].module).weight(self.candidates[n].slot).detach()
                .to("cpu", copy=True) for n in names if n in self.candidates}  # fmt: skip

    @torch.no_grad()
    def set_weights(self, weights: dict[str, torch.Tensor]) -> None:
        params = dict(self.model.named_parameters())
        for name, weight in weights.items():
            if name in self.candidates:
                c = self.candidates[name]
                self.model.get_submodule(c.module).weight(c.slot).copy_(weight)
            elif name in params and not params[name].is_meta:
                params[name].copy_(weight)


def client_blocks(split_point: int, num_blocks: int, tail_blocks: int | None) -> list[int]:
    """The blocks a client holds: [0, s), and [L - t, L) in a U-shaped split (all when s = L)."""
    tail = range(num_blocks - tail_blocks, num_blocks) if tail_blocks is not None else range(0)
    return sorted({*range(min(split_point, num_blocks)), *tail})


class ClientActor(_Holder):
    def __init__(self, spec: dict, client_id: int, items: list[Encoded], split_point: int, local: bool):
        self.tail_blocks = spec.get("tail_blocks")
        blocks = client_blocks(split_point, spec["num_blocks"], None if local else self.tail_blocks)
        device = spec.get("client_device", "cpu")
        self._load(spec, blocks, embedding=True, head=local or self.tail_blocks is not None, device=device)
        batches = Batcher(items, spec["batch_size"], spec["pad_id"], spec["seed"] + client_id)
        self.client = Client(client_id, batches, self.candidates, spec["lr"], spec["alpha"], spec["seed"],
                             spec.get("compression", "fp32"), device)  # fmt: skip

    def configure(self, plan: RoundPlan, ft_lr: float | None) -> None:
        if plan.split_point >= self.num_blocks:
            head = ServerPart(self.arch, self.model, self.num_blocks)
            part = ClientPart(self.arch, self.model, plan.split_point)
            self.client.configure(plan, part, head=head, full_finetune_lr=ft_lr)
        else:
            self.client.configure(plan, client_part(self.arch, self.model, plan.split_point, plan.tail_blocks))

    def forward(self):
        return self.client.forward()

    def tail_step(self, middle):
        return self.client.tail_step(middle)

    def backward(self, gradient):
        return self.client.backward(gradient)

    def local_step(self) -> float:
        return self.client.local_step()

    def measure_importance(self, enabled: bool) -> None:
        self.client.measure_importance(enabled)

    def importance_report(self):
        return self.client.importance_report()

    def counters(self) -> dict:
        return {"samples": self.client.samples, "tokens": self.client.tokens}

    def upload(self):
        return self.client.upload()

    def apply_update(self, update: ModelUpdate) -> None:
        self.client.apply_update(update)

    def apply_adapters(self, broadcast: AdapterBroadcast) -> None:
        self.client.apply_adapters(broadcast)

    @torch.no_grad()
    def eval_forward(self, input_ids, attention_mask, adapter: str | None):
        set_active_adapter(self.client.part, adapter)
        front = self.client.part.front if self.client.u_shaped else self.client.part
        return front(input_ids.to(self.device), attention_mask.to(self.device)).cpu()

    @torch.no_grad()
    def eval_tail_loss(self, hidden, attention_mask, labels, adapter: str | None):
        set_active_adapter(self.client.part, adapter)
        hidden, attention_mask, labels = (t.to(self.device) for t in (hidden, attention_mask, labels))
        total, count = target_token_loss(self.client.part.tail(hidden.to(weights_dtype(self.client.part.tail)),
                                                               attention_mask), labels)  # fmt: skip
        return float(total), count

    @torch.no_grad()
    def eval_head_loss(self, hidden, attention_mask, labels, adapter: str | None):
        set_active_adapter(self.client.head, adapter)
        hidden, attention_mask, labels = (t.to(self.device) for t in (hidden, attention_mask, labels))
        total, count = target_token_loss(self.client.head(hidden, attention_mask), labels)
        return float(total), count

    def adapter_deltas(self) -> dict:
        return self.client.adapter_deltas()

    def state_dict(self, adapters: bool):
        return self.client.state_dict(adapters)

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        self.client.load_state_dict(state, tensors)


class ServerActor(_Holder):
    def __init__(self, spec: dict, shallowest_split: int):
        self.tail_blocks = spec.get("tail_blocks")  # U-shaped: the server holds only the middle
        end = spec["num_blocks"] - (self.tail_blocks or 0)
        device = spec.get("server_device", "cpu")
        self._load(spec, range(shallowest_split, end), embedding=False, head=self.tail_blocks is None, device=device)
        self.server = MainServer(self.candidates, spec["lr"], spec["alpha"], spec["seed"],
                                 spec.get("compression", "fp32"), device)  # fmt: skip

    def configure(self, plan: RoundPlan) -> None:
        self.server.configure(plan, server_part(self.arch, self.model, plan.split_point, self.tail_blocks))

    def step(self, activations):
        return self.server.step(activations)

    def forward_middle(self, activations):
        return self.server.forward_middle(activations)

    def backward_middle(self, tail_gradient):
        return self.server.backward_middle(tail_gradient)

    def measure_importance(self, enabled: bool) -> None:
        self.server.measure_importance(enabled)

    def importance_report(self, client_id: int):
        return self.server.importance_report(client_id)

    def upload(self, client_id: int):
        return self.server.upload(client_id)

    def apply_update(self, update: ModelUpdate) -> None:
        self.server.apply_update(update)

    def apply_adapters(self, broadcast: AdapterBroadcast) -> None:
        self.server.apply_adapters(broadcast)

    @torch.no_grad()
    def eval_loss(self, client_id: int, hidden, attention_mask, labels, adapter: str | None):
        part = self.server.parts[client_id]
        set_active_adapter(part, adapter)
        hidden, attention_mask, labels = (t.to(self.device) for t in (hidden, attention_mask, labels))
        total, count = target_token_loss(part(hidden.to(weights_dtype(part)), attention_mask), labels)
        return float(total), count

    @torch.no_grad()
    def eval_middle(self, client_id: int, hidden, attention_mask, adapter: str | None):
        part = self.server.parts[client_id]
        set_active_adapter(part, adapter)
        return part(hidden.to(self.device, weights_dtype(part)), attention_mask.to(self.device)).cpu()

    def adapter_deltas(self, client_id: int) -> dict:
        return self.server.adapter_deltas(client_id)

    def state_dict(self, adapters: bool) -> dict:
        return self.server.state_dict(adapters)

    def load_state_dict(self, tensors: dict) -> None:
        self.server.load_state_dict(tensors)


class _ServerLost(Exception):
    """The main server's actor died during a step."""


class RayEngine(TrafficLedger):
    """The engine interface of InProcessEngine, over Ray actors."""

    def __init__(
        self,
        spec: dict,
        shards: list[list[Encoded]],
        split_points: list[int],
        candidates: dict,
        fed_server: FedServer,
        address: str | None = None,
        client_resources: dict | None = None,
        server_resources: dict | None = None,
    ):
        import ray

        self.ray = ray
        self.owns_ray = not ray.is_initialized()
        if self.owns_ray:
            import signal
            import threading

            # ray.init installs its own SIGTERM handler (it exits 15 at once); the run's own handler
            # stops it as Ctrl-C does, saying how to resume, so it is put back.
            main_thread = threading.current_thread() is threading.main_thread()
            handler = signal.getsignal(signal.SIGTERM) if main_thread else None
            if address:
                ray.init(address=address, log_to_driver=False)
            else:  # a local instance sized to this machine, listening on localhost only
                import os

                ray.init(num_cpus=os.cpu_count(), object_store_memory=512 * 2**20, include_dashboard=False,
                         log_to_driver=False, _node_ip_address="127.0.0.1")  # fmt: skip
            if main_thread and handler is not None:
                signal.signal(signal.SIGTERM, handler)
        self.spec = spec
        self.shards = shards
        self.split_points = list(split_points)
        self.num_blocks = spec["num_blocks"]
        self.tail_blocks = spec.get("tail_blocks")
        self.candidates = candidates
        self.fed_server = fed_server
        self.local = [s >= self.num_blocks for s in split_points]
        self.client_class = ray.remote(ClientActor).options(**(client_resources or {"num_cpus": 0}))
        self.actors = [self._start_client(cid) for cid in range(len(shards))]
        split = [s for s, local in zip(split_points, self.local, strict=True) if not local]
        self.server_options = server_resources or {"num_cpus": 0}  # e.g. {"num_gpus": 1} with server_device cuda
        self.shallowest = min(split) if split else None
        self.server = self._start_server() if split else None
        # The roles' state when the current round started, with the plans it was saved under: a main
        # server lost mid-round comes back from it, and the round runs again from its start.
        self.round_start: tuple | None = None
        self.round_plans: tuple[list[RoundPlan], float | None] | None = None
        self.importance_on = False
        self.dead: set[int] = set()
        self.snapshots: dict[int, dict] = {}
        self.plans: list[RoundPlan] = []
        self.last_broadcast: AdapterBroadcast | None = None
        self.start_ledger(range(len(shards)))

    def _client_names(self, cid: int) -> set[str]:
        """The candidates client `cid` holds."""
        tail = None if self.local[cid] else self.tail_blocks
        held = set(client_blocks(self.split_points[cid], self.num_blocks, tail))
        return {n for n, c in self.candidates.items() if c.block in held}

    def _start_server(self):
        return self.ray.remote(ServerActor).options(**self.server_options).remote(self.spec, self.shallowest)

    def _server_alive(self) -> bool:
        try:
            self._get(self.server.held_parameter_names.remote())
            return True
        except self.ray.exceptions.RayActorError:
            return False

    def _start_client(self, cid: int):
        return self.client_class.remote(self.spec, cid, self.shards[cid], self.split_points[cid], self.local[cid])

    def _get(self, ref):
        return self.ray.get(ref)

    @property
    def live(self) -> list[int]:
        return [cid for cid in range(len(self.actors)) if cid not in self.dead]

    def shutdown(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()

    # -- a lost client comes back with the last aggregated weights of its blocks -------------------
    def _restart(self, cid: int) -> None:
        self.actors[cid] = self._start_client(cid)
        weights = self._gather(sorted(self._client_names(cid)), exclude=cid)
        self._get(self.actors[cid].set_weights.remote(weights))
        if cid in self.snapshots:
            self._get(self.actors[cid].load_state_dict.remote(*self.snapshots[cid]))
        self.dead.discard(cid)
        self.events.append({"event": "client_restarted", "client": cid})

    def _gather(self, names: Sequence[str], exclude: int | None = None, full: bool = False) -> dict:
        """Current weights by name from whoever holds them: the server, else a living client."""
        found: dict = {}
        if self.server is not None:
            found.update(self._get(self.server.weights.remote(list(names), full)))
        for cid in sorted(self.live, key=lambda c: -self.split_points[c]):
            missing = [n for n in names if n not in found] if not full else list(names)
            if cid == exclude or not missing:
                continue
            for name, weight in self._get(self.actors[cid].weights.remote(missing, full)).items():
                found.setdefault(name, weight)
        return found

    # -- the engine interface --------------------------------------------------------------------
    def configure(self, plans: Sequence[RoundPlan], full_finetune_lr: float | None = None) -> None:
        if [p.split_point for p in plans] != self.split_points:
            raise UsageError("the ray engine keeps each client's cut for the whole run (clients load their blocks "
                             "once); this plan moves a cut.")  # fmt: skip
        for cid in sorted(self.dead):
            self._restart(cid)
        self.plans = list(plans)
        refs = []
        for plan, actor in zip(plans, self.actors, strict=True):
            refs.append(actor.configure.remote(plan, full_finetune_lr))
            if not self.local[plan.client_id]:
                refs.append(self.server.configure.remote(plan))
        self.ray.get(refs)
        self.round_plans = (list(plans), full_finetune_lr)
        if self.round_start is None and plans and plans[0].round >= 1:  # the first round starts from here
            self.round_start = (*self.state(full_finetune_lr is not None, keep=False), list(plans), full_finetune_lr)
        if self.last_broadcast is not None:  # a restarted client takes the aggregated adapters it missed
            for event in self.events:
                if event["event"] == "client_restarted":
                    self._get(self.actors[event["client"]].apply_adapters.remote(self.last_broadcast))
        self.snapshots = {cid: self._get(self.actors[cid].state_dict.remote(False)) for cid in self.live}

    def measure_importance(self, enabled: bool) -> None:
        self.importance_on = enabled
        refs = [self.actors[cid].measure_importance.remote(enabled) for cid in self.live]
        if self.server is not None:
            refs.append(self.server.measure_importance.remote(enabled))
        self.ray.get(refs)

    def _step(self, cid: int) -> float | None:
        actor = self.actors[cid]
        if self.local[cid]:
            return self._get(actor.local_step.remote())
        # Object references chain the calls inside Ray: activations and gradients go between the
        # client actor and the server actor without a stop in the driver; the client reports the
        # loss and the bytes of every message.
        activations = actor.forward.remote()
        if self.tail_blocks is None:
            gradient = self.server.step.remote(activations)
        else:
            middle = self.server.forward_middle.remote(activations)
            gradient = self.server.backward_middle.remote(actor.tail_step.remote(middle))
        record = self._get(actor.backward.remote(gradient))
        self.add_traffic(cid, record.traffic)
        return record.loss

    def step_all(self) -> list[float | None]:
        """One step of every living client; a client whose actor fails is marked lost (None)."""
        losses: list[float | None] = []
        for cid in range(len(self.actors)):
            loss = None
            if cid not in self.dead:
                try:
                    loss = self._step(cid)
                except (self.ray.exceptions.RayActorError, self.ray.exceptions.RayTaskError):
                    if self.server is not None and not self._server_alive():
                        raise _ServerLost() from None
                    self.dead.add(cid)
                    self.events.append({"event": "client_lost", "client": cid, "step": self.round_steps})
            losses.append(loss)
        return losses

    def local_steps(self, steps: int, on_step=None) -> list[list[float | None]]:
        """As every engine does; a main server lost on the way is restarted from the state this round
        started from, every role goes back to it, and the round's steps run again."""
        try:
            return super().local_steps(steps, on_step)
        except _ServerLost:
            if self.round_start is None:
                raise
            self._recover_server()
            return super().local_steps(steps, on_step)

    def _recover_server(self) -> None:
        state, tensors, saved_plans, saved_lr = self.round_start
        plans, full_finetune_lr = self.round_plans
        events = [*self.events, {"event": "server_restarted", "step": self.round_steps}]
        self.server = self._start_server()
        self.load_state(state, tensors, saved_plans, saved_lr)  # every role as the round started
        self.configure(plans, full_finetune_lr)  # then this round's plan, as before
        self.measure_importance(self.importance_on)
        self.reset_traffic()  # the round's counts start again with its steps
        self.events = events

    def importance_reports(self) -> list[tuple[dict[str, float], int, int]]:
        reports = []
        for cid in range(len(self.actors)):
            if cid in self.dead:
                reports.append(({}, 0, 0))
                continue
            client_sums, batches = self._get(self.actors[cid].importance_report.remote())
            server_sums = {} if self.local[cid] else self._get(self.server.importance_report.remote(cid))[0]
            samples = self._get(self.actors[cid].counters.remote())["samples"]
            reports.append(({**client_sums, **server_sums}, batches, samples))
        return reports

    def round_counters(self) -> list[dict[str, int]]:
        return [{"samples": 0, "tokens": 0} if cid in self.dead else self._get(self.actors[cid].counters.remote())
                for cid in range(len(self.actors))]  # fmt: skip

    def aggregate(self, round_: int) -> ModelUpdate | AdapterBroadcast:
        """Uploads of the clients still alive (weights renormalise over them) -> fed server -> back."""
        uploads = []
        for cid in self.live:
            upload = self._get(self.actors[cid].upload.remote())
            self.traffic[cid]["adapters_up"] += upload.nbytes()
            uploads.append(upload)
            if not self.local[cid]:
                uploads.append(self._get(self.server.upload.remote(cid)))
        result = self.fed_server.aggregate(round_, uploads)
        method = "apply_update" if isinstance(result, ModelUpdate) else "apply_adapters"
        refs = []
        for cid in self.live:
            self.traffic[cid]["adapters_down"] += result.nbytes(self._client_names(cid))
            refs.append(getattr(self.actors[cid], method).remote(result))
        if self.server is not None:
            refs.append(getattr(self.server, method).remote(result))
        self.ray.get(refs)
        if isinstance(result, AdapterBroadcast):
            self.last_broadcast = result
        return result

    def validation_loss(self, batches: Sequence, client_id: int | None) -> float:
        cid = client_id if client_id in self.live else self.live[0]
        adapter = None if client_id is None else adapter_name(cid)
        total, count = 0.0, 0
        for batch in batches:
            hidden = self._get(self.actors[cid].eval_forward.remote(batch.input_ids, batch.attention_mask, adapter))
            if self.local[cid]:
                loss_sum, n = self._get(self.actors[cid].eval_head_loss.remote(hidden, batch.attention_mask,
                                                                               batch.labels, adapter))  # fmt: skip
            elif self.tail_blocks is not None:  # the labels stay on the client
                middle = self.server.eval_middle.remote(cid, hidden, batch.attention_mask, adapter)
                loss_sum, n = self._get(self.actors[cid].eval_tail_loss.remote(middle, batch.attention_mask,
                                                                               batch.labels, adapter))  # fmt: skip
            else:
                loss_sum, n = self._get(self.server.eval_loss.remote(cid, hidden, batch.attention_mask, batch.labels,
                                                                     adapter))  # fmt: skip
            total += loss_sum
            count += n
        return total / count if count else float("nan")

    def warmup_importance(self) -> list[tuple[dict[str, float], int]]:
        """One split step per client on the frozen model (no adapters yet), both sides measuring."""
        self.configure([RoundPlan(cid, 0, s, {}, self.tail_blocks) for cid, s in enumerate(self.split_points)])
        self.measure_importance(True)
        self.local_steps(1)
        reports = [(sums, batches) for sums, batches, _ in self.importance_reports()]
        self.measure_importance(False)
        return reports

    def trained_weights(self, full_finetune: bool) -> dict[str, torch.Tensor]:
        if full_finetune:
            return self._gather([""], full=True)
        return self._gather(list(self.candidates))

    def export_weights(self, client_id: int | None, full_finetune: bool) -> dict[str, torch.Tensor]:
        final = self.trained_weights(full_finetune)
        if client_id is not None and not full_finetune:
            cid = client_id if client_id in self.live else self.live[0]
            deltas = dict(self._get(self.actors[cid].adapter_deltas.remote()))
            if not self.local[cid]:
                deltas.update(self._get(self.server.adapter_deltas.remote(cid)))
            for name, delta in deltas.items():
                final[name] = final[name] + delta
        return final

    def state(self, full_finetune: bool, keep: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
        """The checkpoint schema of InProcessEngine.state, gathered from the actors. At a round's end
        (`keep`) it is also where a lost main server restarts the next round from."""
        tensors = {f"weight/{n}": w for n, w in self.trained_weights(full_finetune).items()}
        states = []
        for cid, actor in enumerate(self.actors):
            state, role = self._get(actor.state_dict.remote(not full_finetune)) if cid not in self.dead else (
                self.snapshots[cid])  # fmt: skip
            states.append(state)
            tensors.update({f"client/{cid}/{k}": v for k, v in role.items()})
        if self.server is not None:
            server = self._get(self.server.state_dict.remote(not full_finetune))
            tensors.update({f"server/{k}": v for k, v in server.items()})
        tensors.update({f"fed/{k}": v for k, v in self.fed_server.state_dict().items()})
        if keep and self.round_plans is not None:
            self.round_start = ({"clients": states}, dict(tensors), *self.round_plans)
        return {"clients": states}, tensors

    def load_state(self, state, tensors, plans, full_finetune_lr: float | None) -> None:
        weights = {k[len("weight/") :]: v for k, v in tensors.items() if k.startswith("weight/")}
        refs = [actor.set_weights.remote(weights) for actor in self.actors]
        if self.server is not None:
            refs.append(self.server.set_weights.remote(weights))
        self.ray.get(refs)
        self.configure(plans, full_finetune_lr=full_finetune_lr)
        refs = [actor.load_state_dict.remote(state["clients"][cid], role_tensors(tensors, f"client/{cid}/"))
                for cid, actor in enumerate(self.actors)]  # fmt: skip
        if self.server is not None:
            refs.append(self.server.load_state_dict.remote(role_tensors(tensors, "server/")))
        self.ray.get(refs)
        self.fed_server.load_state_dict(role_tensors(tensors, "fed/"))
