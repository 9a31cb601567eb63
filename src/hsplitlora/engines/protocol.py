"""The round protocol, written once: configure, the standard and U-shaped split steps, local
steps, importance, aggregate and send back, validate, export, and the checkpoint's state. It
talks to hosts (engines/hosts.py) through a transport (engines/transport.py): the in-process one
calls them directly, the Ray and Flower ones through actors or nodes that can be lost.

A client host that is lost during a round (in a step, or in any other call to it) does not stop
the run: the round completes with the others (aggregation weights renormalise over them since
only their uploads arrive), the event is logged, and the client comes back for the next round
with the last aggregated weights of its blocks (taken from the hosts that kept them) and its
state at the start of the round; a client that cannot be brought back yet (its Flower node is
still down) stays out of that round too (`client_unavailable`) and is tried again the next. A main
server lost during a round comes back from the state the round started from, every host goes
back to it, and the round's steps run again."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hsplitlora.engines.hosts import ClientHost, ServerHost, client_blocks
from hsplitlora.engines.traffic import TrafficLedger
from hsplitlora.engines.transport import Transport
from hsplitlora.privacy.dp import LostRound, fresh_stream
from hsplitlora.roles.adapters import adapter_name
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.messages import AdapterBroadcast, ModelUpdate, RoundPlan


class ServerLost(Exception):
    """The main server's host was lost during a step."""


class Engine(TrafficLedger):
    """Runs rounds over a transport's hosts; `cuts` are the split points before the first plan."""

    def __init__(
        self, transport: Transport, candidates: dict, fed_server: FedServer | None, num_blocks: int,
        tail_blocks: int | None = None, cuts: Sequence[int] | None = None,
    ):  # fmt: skip
        self.transport = transport
        self.candidates = candidates
        self.fed_server = fed_server or FedServer()
        self.num_blocks = num_blocks
        self.tail_blocks = tail_blocks
        self.split_points = list(cuts) if cuts is not None else [num_blocks] * len(transport.clients)
        self.warmup_recompute = [False] * len(self.split_points)  # who recomputes in the warm-up (setup.py)
        self.plans: list[RoundPlan] = []
        self.message_log: list | None = None  # a list here records every message of every split step
        self.importance_on = False
        self.dead: set[int] = set()
        self.snapshots: dict[int, tuple] = {}  # each client's state when the round started
        self.snapshot_plans: dict[int, RoundPlan] = {}  # ... and the plan it had then (its adapters' shapes)
        # Batches each client was sent since its snapshot (the one in flight included): what a
        # lost client's DP counts when it comes back; and how many catch-ups each has had.
        self.since_snapshot: dict[int, int] = {}
        self.catch_ups: dict[int, int] = {}
        self.round_start: tuple | None = None  # every host's state when the round started
        self.last_broadcast: AdapterBroadcast | None = None
        self.sampled: set[int] | None = None  # the clients that train this round (None: every one)
        self.quantized = False  # some role computes its blocks from quantized weights (setup.set_quant)
        self.start_ledger(range(len(transport.clients)))

    # -- who is where ------------------------------------------------------------------------------
    # The hosts' methods are called directly; each returns its value, or under Ray a reference to
    # it (`_get` gives the value), so a split step's calls chain without a stop in the driver.
    @property
    def server(self) -> ServerHost | None:
        return self.transport.server

    @property
    def actors(self) -> list[ClientHost]:
        return self.transport.clients

    @property
    def live(self) -> list[int]:
        return [cid for cid in range(len(self.actors)) if cid not in self.dead]

    def sample(self, clients: Sequence[int] | None) -> None:
        """The clients that train and upload from now on (None: every one); the others are
        configured, take the update and keep their adapters and optimizer state."""
        self.sampled = None if clients is None else set(clients)

    def trains(self, cid: int) -> bool:
        """Whether client `cid` runs local steps and uploads this round: sampled and not lost."""
        return cid not in self.dead and (self.sampled is None or cid in self.sampled)

    def local(self, cid: int) -> bool:
        """Whether client `cid` runs the whole model (no split)."""
        return self.split_points[cid] >= self.num_blocks

    def _tail(self, cid: int) -> int | None:
        """The last blocks client `cid` also runs (U-shaped), else None."""
        tail = self.plans[cid].tail_blocks if self.plans else self.tail_blocks
        return None if self.local(cid) else tail

    def u_shaped(self, cid: int) -> bool:
        return self._tail(cid) is not None

    def client_names(self, cid: int) -> set[str]:
        """The candidates client `cid` holds."""
        held = set(client_blocks(self.split_points[cid], self.num_blocks, self._tail(cid)))
        return {n for n, c in self.candidates.items() if c.block in held}

    def _lose(self, cid: int) -> None:
        """Client `cid`'s host is lost: it is out of the round (its upload too), and comes back at
        the next configure. A lost main server is the round's to recover (ServerLost)."""
        if not self.transport.server_alive():
            raise ServerLost()
        self.dead.add(cid)
        self.events.append({"event": "client_lost", "client": cid, "step": self.round_steps})

    def _each(self, calls: dict) -> dict:
        """`calls[cid]()` for each client in order (the key None: the main server), all sent before
        any answer is awaited; the answers by key. A client whose host is lost on the way is lost
        for the round and has no answer; a lost main server raises."""
        sent = {}
        for cid, call in calls.items():
            try:
                sent[cid] = call()
            except self.transport.lost:
                if cid is None:
                    raise
                self._lose(cid)
        answers = {}
        for cid, reference in sent.items():
            try:
                answers[cid] = self._get(reference)
            except self.transport.lost:
                if cid is None:
                    raise
                self._lose(cid)
        return answers

    def _get(self, reference):
        return self.transport.get(reference)

    def shutdown(self) -> None:
        self.transport.shutdown()

    # -- a round ---------------------------------------------------------------------------------
    def configure(self, plans: Sequence[RoundPlan]) -> None:
        """Give each client and the main server their parts for the round's cuts, and adapters.
        A split point of L (every block) means no split: the client also holds the head. With a
        plan's `tail_blocks` t the split is U-shaped: the server runs blocks [s, L - t) only."""
        self.transport.check_plans(plans)
        for cid in sorted(self.dead):
            try:
                self._restart_client(cid, plans[0].round if plans else 0)
            except self.transport.lost:  # its machine is still gone (a Flower node): out of this round too
                self.events.append({"event": "client_unavailable", "client": cid})
        self.plans = list(plans)
        self.split_points = [plan.split_point for plan in plans]
        refs = [self.server.configure(plan) for plan in plans if not self.local(plan.client_id)]
        self._each({plan.client_id: (lambda plan=plan: self.actors[plan.client_id].configure(plan))
                    for plan in plans if plan.client_id not in self.dead})  # fmt: skip
        self._get(refs)
        if self.transport.can_lose_hosts:
            self._keep_round_start(plans)

    def measure_importance(self, enabled: bool) -> None:
        self.importance_on = enabled
        refs = [] if self.server is None else [self.server.measure_importance(enabled)]
        self._each({cid: (lambda cid=cid: self.actors[cid].measure_importance(enabled)) for cid in self.live})
        self._get(refs)

    def _cross(self, message):
        """A message crossing between client and main server (kept when `message_log` is a list)."""
        if self.message_log is not None:
            self.message_log.append(message)
        return message

    def split_step(self, cid: int) -> float | None:
        """One split step: client forward -> activations -> server forward, loss, backward and
        update -> activation gradient -> client backward and update. U-shaped: client front ->
        activations -> server middle -> its activations -> client tail, loss, backward -> their
        gradient -> server backward -> activation gradient -> client front backward. Under Ray
        the references chain the calls without a stop in the driver. The loss."""
        client = self.actors[cid]
        activations = self._cross(client.forward())
        if self.u_shaped(cid):
            middle = self._cross(self.server.forward_middle(activations))
            tail_gradient = self._cross(client.tail_step(middle))
            gradient = self._cross(self.server.backward_middle(tail_gradient))
        else:
            gradient = self._cross(self.server.step(activations))
        record = self._get(client.backward(gradient))
        self.add_traffic(cid, record.traffic)
        return record.loss

    def step_all(self) -> list[float | None]:
        """One local step of every living client (split ones interleaved on the main server); a
        client whose host is lost during the step is marked lost (None)."""
        losses: list[float | None] = []
        for cid in range(len(self.actors)):
            loss = None
            if self.trains(cid):
                self.since_snapshot[cid] = self.since_snapshot.get(cid, 0) + 1
                try:
                    loss = self._get(self.actors[cid].local_step()) if self.local(cid) else (
                        self.split_step(cid))  # fmt: skip
                except self.transport.lost:
                    self._lose(cid)
            losses.append(loss)
        return losses

    def local_steps(self, steps: int, on_step=None) -> list[list[float | None]]:
        """`steps` local steps of every client; a main server lost on the way comes back from the
        state this round started from, and the round's steps run again."""
        try:
            return super().local_steps(steps, on_step)
        except ServerLost:
            if self.round_start is None:
                raise
            self._recover_server()
            return super().local_steps(steps, on_step)

    def importance_reports(self) -> list[tuple[dict[str, float], int, int]]:
        """Per client: (sum_j w_j dL/dw_j per candidate over its batches, batches, samples)."""
        reports = []
        for cid in range(len(self.actors)):
            if not self.trains(cid):
                reports.append(({}, 0, 0))
                continue
            try:
                client_sums, batches = self._get(self.actors[cid].importance_report())
                samples = self._get(self.actors[cid].counters())["samples"]
            except self.transport.lost:
                self._lose(cid)
                reports.append(({}, 0, 0))
                continue
            server_sums = {} if self.local(cid) else self._get(self.server.importance_report(cid))[0]
            reports.append(({**client_sums, **server_sums}, batches, samples))
        return reports

    def round_counters(self) -> list[dict[str, int]]:
        counters = self._each({cid: self.actors[cid].counters for cid in self.live})
        return [counters.get(cid, {"samples": 0, "tokens": 0}) for cid in range(len(self.actors))]

    def aggregate(self, round_: int) -> ModelUpdate | AdapterBroadcast:
        """Uploads of the living sampled clients (weights renormalise over them) -> fed server -> its
        update back to every holder, sampled or not: merged once per copy of the weights (only the
        sampled clients' anchors move), or the averaged adapters."""
        uploads = []
        for cid in filter(self.trains, self.live):
            upload = self._each({cid: self.actors[cid].upload}).get(cid)
            if upload is None:  # lost on the way: left out, as its steps would have been
                continue
            self.traffic[cid]["adapters_up"] += upload.nbytes()
            uploads.append(upload)
            if not self.local(cid):
                uploads.append(self._get(self.server.upload(cid)))
        result = self.fed_server.aggregate(round_, uploads)
        hosts = [(cid, self.actors[cid]) for cid in self.live]
        if self.server is not None:
            hosts.append((None, self.server))
        for cid in self.live:
            sent = self._update_for(result, [cid]) if isinstance(result, ModelUpdate) else result
            self.traffic[cid]["adapters_down"] += sent.nbytes(self.client_names(cid))
        if isinstance(result, ModelUpdate):
            # Each copy gets the update without the terms its adapters hold, and rebuilds them; it
            # merges before any anchor moves (the rebuild reads anchors).
            messages = {id(host): self._update_for(result, roles, whole) for host, roles, whole in
                        self.transport.copies(self.live)}  # fmt: skip
            if self.server is not None and not self.local_only:
                self.server_adapters_down = self._update_for(result, [None]).nbytes()
            hosts.sort(key=lambda pair: id(pair[1]) not in messages)
            sampled = sorted(self.sampled) if self.sampled is not None else None
            self._each({cid: (lambda host=host: host.apply_update(messages.get(id(host), result), id(host) in messages,
                                                                  sampled)) for cid, host in hosts})  # fmt: skip
        else:
            self._each({cid: (lambda host=host: host.apply_adapters(result)) for cid, host in hosts})
            self.last_broadcast = result
        return result

    @property
    def local_only(self) -> bool:
        return all(self.local(cid) for cid in self.live)

    def server_names(self) -> set[str]:
        """The candidates the main server holds: every one some living split client does not."""
        return {n for cid in self.live if not self.local(cid) for n in set(self.candidates) - self.client_names(cid)}

    def _update_for(self, update: ModelUpdate, roles: Sequence[int | None], whole: bool = False) -> ModelUpdate:
        """The update as sent to the copy of `roles` (client ids; None: the main server): the
        candidates it holds (all if `whole`), each without the terms of the adapters it holds."""
        held: dict[str, set[int]] = {}
        names: set[str] = set()
        for role in roles:
            if role is None:
                server = self.server_names()
                names |= server
                for cid in self.live:
                    for name in server - self.client_names(cid) if not self.local(cid) else ():
                        held.setdefault(name, set()).add(cid)
            else:
                names |= self.client_names(role)
                for name in self.client_names(role):
                    held.setdefault(name, set()).add(role)
        return self.fed_server.update_for(update, None if whole else names, held)

    def validation_loss(self, batches: Sequence, client_id: int | None) -> float:
        """Mean target-token loss of the current model, through the same split graph as training:
        merged weights, plus client `client_id`'s adapters for strategies whose adapters carry the
        update (None: merged weights only, seen through the first living client's cut)."""
        cid = client_id if client_id in self.live else self.live[0]
        try:
            return self._validation_loss(batches, cid, None if client_id is None else adapter_name(cid))
        except self.transport.lost:  # the client lost on the way: another one's cut sees the same weights
            self._lose(cid)
            return self.validation_loss(batches, client_id)

    def _validation_loss(self, batches: Sequence, cid: int, adapter: str | None) -> float:
        client, total, count = self.actors[cid], 0.0, 0
        for batch in batches:
            if self.local(cid):
                reference = client.validation_local(batch, adapter)
            elif self.u_shaped(cid):  # the labels stay on the client
                activations = client.validation_forward(batch, adapter)
                middle = self.server.validation_middle(activations, adapter)
                reference = client.validation_tail(middle, batch, adapter)
            else:
                activations = client.validation_forward(batch, adapter)
                reference = self.server.validation_loss(activations, adapter)
            loss_sum, n = self._get(reference)
            total += loss_sum
            count += n
        return total / count if count else float("nan")

    def warmup_importance(self) -> list[tuple[dict[str, float], int]]:
        """Round 1's importance before any training: one split step per client on the frozen model
        (no adapters yet) at the first cuts, client and main server measuring, on a batch of the
        client's warm-up stream (its own shard, not the training stream: one batch order per seed)."""
        self.configure([RoundPlan(cid, 0, s, {}, self.tail_blocks, recompute=self.warmup_recompute[cid])
                        for cid, s in enumerate(self.split_points)])  # fmt: skip
        self.measure_importance(True)
        self._get([self.actors[cid].warm_up(True) for cid in self.live])
        self.local_steps(1)
        self._get([self.actors[cid].warm_up(False) for cid in self.live])
        reports = [(sums, batches) for sums, batches, _ in self.importance_reports()]
        self.measure_importance(False)
        return reports

    # -- weights, export and the checkpoint ---------------------------------------------------------
    def _gather(self, names: Sequence[str], exclude: int | None = None, full: bool = False) -> dict:
        """Current weights by name from whoever holds them: the server, else a living client."""
        found: dict = {}
        if self.server is not None:
            found.update(self._get(self.server.weights(list(names), full)))
        for cid in sorted(self.live, key=lambda c: -self.split_points[c]):
            missing = [n for n in names if n not in found] if not full else list(names)
            if cid == exclude or not missing:
                continue
            skip = sorted(found) if full else ()
            held = self._each({cid: lambda c=cid, m=missing, k=skip: self.actors[c].weights(m, full, k)})
            found.update(held.get(cid, {}))  # a client lost on the way: the next holder's copy
        return found

    @property
    def trains_every_weight(self) -> bool:
        """Whether the configured round trains every weight instead of adapters (its plans say so)."""
        return any(plan.full_finetune_lr is not None for plan in self.plans)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """What training changed: every candidate's merged weight, or every weight under full FT."""
        return self._gather([""], full=True) if self.trains_every_weight else self._gather(list(self.candidates))

    def export_weights(self, client_id: int | None) -> dict[str, torch.Tensor]:
        """The final model's trained weights, with client `client_id`'s adapters folded in."""
        full_finetune = self.trains_every_weight
        final = self.trained_weights()
        if self.quantized and not full_finetune:  # the weights the adapters were trained on: dequantized
            cid = client_id if client_id in self.live else self.live[0]
            holders = [(self.actors[cid], self.client_names(cid))]
            if not self.local(cid):
                holders.insert(0, (self.server, self.server_names()))
            for host, names in holders:  # the client's blocks last: they override the server's
                final.update(self._get(host.weights(sorted(names), False, (), True)))
        if client_id is not None and not full_finetune:
            cid = client_id if client_id in self.live else self.live[0]
            deltas = dict(self._get(self.actors[cid].adapter_deltas()))
            if not self.local(cid):
                deltas.update(self._get(self.server.adapter_deltas(cid)))
            for name, delta in deltas.items():
                final[name] = final[name] + delta
        return final

    def state(self, keep: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
        """Every host's state at a round boundary, in the one checkpoint schema: `weight/{name}`,
        `client/{cid}/...` (generator, adapters with anchors and optimizer state), `server/...`,
        `fed/...` (the fed server's held uploads); batch orders and steps as JSON. At a round's
        end (`keep`) it is also where a lost main server restarts the next round from."""
        full_finetune = self.trains_every_weight
        tensors = {f"weight/{n}": w for n, w in self.trained_weights().items()}
        states = []
        held = self._each({cid: (lambda cid=cid: self.actors[cid].state_dict(not full_finetune)) for cid in self.live})
        for cid in range(len(self.actors)):
            if cid in held:
                state, role = held[cid]
            else:  # a lost client: as its round began, and what it must catch up on when it comes back
                state, role = self.snapshots[cid]
                upcoming = self.plans[0].round + 1 if self.plans else 0  # the round it would come back at
                lost = LostRound(self.since_snapshot.get(cid, 0), self._stream(cid, upcoming, advance=False))
                state = {**state, "lost": lost.to_dict()}
                if cid in self.snapshot_plans:  # its adapters have that plan's shapes
                    state["plan"] = dataclasses.asdict(self.snapshot_plans[cid])
            states.append(state)
            tensors.update({f"client/{cid}/{k}": v for k, v in role.items()})
        if self.server is not None:
            server = self._get(self.server.state_dict(not full_finetune))
            tensors.update({f"server/{k}": v for k, v in server.items()})
        tensors.update({f"fed/{k}": v for k, v in self.fed_server.state_dict().items()})
        found = {"clients": states}
        if self.last_broadcast is not None and len(held) < len(self.actors):
            # A client that is out holds factors from before the last averaging: it takes them when it
            # comes back, from this state too (a resume, a main server's recovery).
            found["broadcast_round"] = self.last_broadcast.round
            for name, (a, b) in self.last_broadcast.factors.items():
                tensors[f"broadcast/{name}/a"], tensors[f"broadcast/{name}/b"] = a, b
        if keep and self.transport.can_lose_hosts and self.plans:
            self.round_start = (found, dict(tensors), self.plans)
        return found, tensors

    def load_state(self, state: dict, tensors: dict[str, torch.Tensor], plans: Sequence[RoundPlan]) -> None:
        """Undo `state`: the inverse, given the plans the checkpointed round ran with."""
        weights = role_tensors(tensors, "weight/")
        self._get([host.set_weights(weights) for host in self.transport.owners(self.live)])
        self.configure(plans)  # adapters need their parts and shapes
        for cid, client in enumerate(state["clients"]):
            if "plan" in client:  # a client that was out: its adapters have the shapes of its snapshot's plan
                plan = _lost_client_plan(cid, client["plan"], plans[cid])
                self._get(self.actors[cid].configure(plan))
                self.snapshot_plans[cid] = plan
        refs = [host.load_state_dict(state["clients"][cid], role_tensors(tensors, f"client/{cid}/"))
                for cid, host in enumerate(self.actors)]  # fmt: skip
        if self.server is not None:
            refs.append(self.server.load_state_dict(role_tensors(tensors, "server/")))
        self._get(refs)
        self.fed_server.load_state_dict(role_tensors(tensors, "fed/"))
        if "broadcast_round" in state:  # the averaged factors the clients that were out missed
            held = role_tensors(tensors, "broadcast/")
            names = sorted({key.rsplit("/", 1)[0] for key in held})
            if any(f"{n}/a" not in held or f"{n}/b" not in held for n in names):
                raise ValueError("the checkpoint's last averaged factors (broadcast/NAME/a and /b) are incomplete")
            self.last_broadcast = AdapterBroadcast(int(state["broadcast_round"]),
                                                   {n: (held[f"{n}/a"], held[f"{n}/b"]) for n in names})  # fmt: skip
            out = [cid for cid, client in enumerate(state["clients"]) if "lost" in client]
            self._get([self.actors[cid].apply_adapters(self.last_broadcast) for cid in out])
        if self.transport.can_lose_hosts:  # configure above kept the hosts as they were before loading
            self.round_start = (state, dict(tensors), list(plans))
            self._snapshot()

    def _snapshot(self) -> None:
        """Each living client's state as the one it comes back to if lost, adapters included (a
        client still out keeps the snapshot it was lost with), and its plan then; its count of
        batches sent since starts again."""
        adapters = not self.trains_every_weight
        self.snapshots.update(self._each({cid: (lambda c=cid: self.actors[c].state_dict(adapters))
                                          for cid in self.live}))  # fmt: skip
        self.snapshot_plans.update({plan.client_id: plan for plan in self.plans if plan.client_id in self.live})
        self.since_snapshot.update(dict.fromkeys(self.live, 0))

    def _stream(self, cid: int, round_: int, advance: bool = True) -> int:
        """A restart noise stream for client `cid` no earlier catch-up of this engine used: the round
        it comes back at and its count of catch-ups so far."""
        key = 1_000_000 * max(round_, 0) + self.catch_ups.get(cid, 0) + 1
        if advance:
            self.catch_ups[cid] = self.catch_ups.get(cid, 0) + 1
        return key

    # -- lost hosts ----------------------------------------------------------------------------------
    def _keep_round_start(self, plans: Sequence[RoundPlan]) -> None:
        """After configure, where hosts can be lost: the first round's starting state, the
        aggregated adapters a restarted client missed, and each client's state as a snapshot."""
        if self.round_start is None and plans and plans[0].round >= 1:
            self.round_start = (*self.state(keep=False), self.plans)
        if self.last_broadcast is not None:
            restarted = [e["client"] for e in self.events if e["event"] == "client_restarted"]
            self._get([self.actors[cid].apply_adapters(self.last_broadcast) for cid in restarted])
        self._snapshot()

    def _restart_client(self, cid: int, round_: int) -> None:
        """A lost client comes back with the last aggregated weights of its blocks and its state
        when its snapshot was taken (its adapters and their optimizer state as that round began, as
        a resume from a checkpoint written while it was out gives it), told how many batches it was
        sent since (its DP counts them and moves to a noise stream of its own, `_stream`)."""
        self.transport.restart_client(cid)
        weights = self._gather(sorted(self.client_names(cid)), exclude=cid)
        self._get(self.actors[cid].set_weights(weights))
        if cid in self.snapshots:
            state, tensors = self.snapshots[cid]
            if cid in self.snapshot_plans:  # its adapters as the snapshot's round began (their shapes first)
                self._get(self.actors[cid].configure(self.snapshot_plans[cid]))
            lost = LostRound(self.since_snapshot.get(cid, 0), self._stream(cid, round_))
            self._get(self.actors[cid].load_state_dict({**state, "lost": lost.to_dict()}, tensors))
        self.dead.discard(cid)
        self.events.append({"event": "client_restarted", "client": cid})

    def _recover_server(self) -> None:
        state, tensors, saved_plans = self.round_start
        plans = self.plans
        events = [*self.events, {"event": "server_restarted", "step": self.round_steps}]
        # A client restarted this round comes back from its snapshot, not from where its restart
        # left it (the round start holds no adapters of a client that was out): its replay is not
        # the aborted attempt's, so its DP counts those batches too and draws fresh noise.
        restarted = {e["client"] for e in self.events if e["event"] == "client_restarted"} - self.dead
        aborted = {cid: self.since_snapshot.get(cid, 0) for cid in restarted}
        self.transport.restart_server()
        round_ = plans[0].round if plans else 0
        tensors = dict(tensors)  # its adapters' DP-SGD noise on the main server moves on too
        for cid in sorted(restarted):
            name = f"server/dp/{cid}/rng"
            if name in tensors:
                tensors[name] = fresh_stream(tensors[name], self._stream(cid, round_))
        self.load_state(state, tensors, saved_plans)  # every host as the round started
        for cid in sorted(restarted - self.dead):
            held, role = self._get(self.actors[cid].state_dict(not self.trains_every_weight))
            lost = LostRound(aborted[cid], self._stream(cid, round_))
            self._get(self.actors[cid].load_state_dict({**held, "lost": lost.to_dict()}, role))
        self.configure(plans)  # then this round's plan, as before
        self.measure_importance(self.importance_on)
        self.reset_traffic()  # the round's counts start again with its steps
        self.events = events


def role_tensors(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of one role in a checkpoint, without its prefix."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def _lost_client_plan(cid: int, fields, current: RoundPlan) -> RoundPlan:
    """The plan a checkpoint keeps for a client that was out (its adapters' shapes), checked against
    the plan the checkpointed round gave it: the same client, candidates, tail and adapter lifecycle;
    a cut and ranks that are counts. A ValueError names what is wrong."""
    try:
        plan = RoundPlan(**fields)
    except TypeError as error:
        raise ValueError(f"the checkpoint's plan of client {cid}, which was out, is malformed") from error
    counts = isinstance(plan.ranks, dict) and all(type(r) is int and r >= 0 for r in plan.ranks.values())
    if not (
        plan.client_id == cid
        and type(plan.split_point) is int
        and plan.split_point >= 0
        and counts
        and set(plan.ranks) == set(current.ranks)
        and (plan.tail_blocks, plan.adapters) == (current.tail_blocks, current.adapters)
        and (plan.full_finetune_lr is None) == (current.full_finetune_lr is None)
        and isinstance(plan.recompute, bool)
    ):  # fmt: skip
        raise ValueError(f"the checkpoint's plan of client {cid}, which was out, does not fit the run")
    return plan
