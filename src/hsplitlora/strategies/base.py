"""The strategy interface: how a method plans each round (cuts and ranks) and how the fed server
aggregates, and what the loop and setup ask it (who trains on what, which clients train, what
starts a round, what is validated and exported). Every baseline and ablation is a subclass, like
Flower's strategies."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from hsplitlora.config import DEFAULT_RANK
from hsplitlora.devices import DeviceProfile
from hsplitlora.errors import UsageError
from hsplitlora.method.aggregation import Aggregation, ExactChange
from hsplitlora.method.importance import should_replan
from hsplitlora.method.memory import MemoryModel
from hsplitlora.method.planner import ClientPlan, Plan, client_plan
from hsplitlora.method.sampling import sample_clients
from hsplitlora.roles.messages import RoundPlan
from hsplitlora.time_model import Workload, predicted_times


@dataclass
class StrategyContext:
    memory: MemoryModel
    devices: list[DeviceProfile]
    server_budget: int
    levels: tuple[int, ...]
    rho: float
    s_min: int
    replan_delta: float
    fixed_split_points: list[int] | None = None
    fixed_ranks: list[int] | None = None
    split_rule: str = "deepest"  # ARMSC's cut: fastest (time model) | deepest (memory only)
    adapter_lifecycle: str = "persist"  # NAA's adapters: persist (with anchors) | recreate (every round)
    workload: Workload | None = None  # what a round does, for predicting round times
    clients_per_round: int | None = None  # m clients train (and share the main server) each round; None: all K
    truncated_update: Aggregation | None = None  # update_form svd-ef: NAA's exact change sent truncated
    full_finetune_lr: float | None = None  # the learning rate of strategies that train every weight
    rank_time_slack: float | None = None  # ranks may lengthen the predicted round by this share at most


@dataclass
class Arrangement:
    """Who trains on what: each trainer's shard (indices into the training items) and device, the
    local steps of a round, and a note for the person running it (empty: nothing to say)."""

    shards: list[list[int]]
    devices: list[DeviceProfile]
    steps_per_round: int
    note: str = ""


# What each aggregation's result leaves adapters to do (RoundPlan.adapters): a change merged into W
# is measured from an anchor (NAA reads it) or taken by re-created adapters; averaged factors are
# kept by their holders, who overwrite theirs with them.
UPDATE_RULES = {"merges, reads anchors": ("anchor", "recreate"), "merges": ("recreate",), "averages": ("overwrite",)}


def check_update_rule(name: str, aggregation: Aggregation, adapters: str) -> None:
    """The one check of a strategy's (aggregation, adapters) pair: raise ValueError when the
    adapters' life cycle cannot follow what the fed server sends down (a strategy's defect, not a
    user's setting)."""
    kind = "averages" if not aggregation.merges else "merges, reads anchors" if aggregation.reads_anchors else "merges"
    if adapters not in UPDATE_RULES[kind]:
        raise ValueError(f"strategy {name!r} pairs {type(aggregation).__name__}, which {kind}, with adapters "
                         f"{adapters!r}; it admits {' or '.join(UPDATE_RULES[kind])}.")  # fmt: skip


class Strategy:
    name: str = ""
    aggregation: Aggregation = ExactChange()  # how the fed server combines updates (method/aggregation.py)
    adapters: str = "recreate"  # RoundPlan.adapters: recreate | anchor | overwrite
    uses_importance: bool = True
    centralised: bool = False  # one trainer on the pooled data (upper references)
    full_finetune: bool = False  # every weight trained, no adapters
    splits: bool = True  # cuts the model between client and main server (False: every client runs it whole)
    adapter_lifecycles: bool = False  # follows adapter_lifecycle (persist | recreate); else its own fixed one
    times_ranks: bool = False  # its ranks follow rank_time_slack (the time model prices them)

    def __init__(self, context: StrategyContext):
        aggregation, adapters = self.update_rule(context)
        if context.truncated_update is not None:
            if type(aggregation) is not ExactChange:
                raise UsageError(f"update_form svd-ef truncates NAA's exact change, and {self.name} aggregates "
                                 "otherwise; drop update_form or choose a strategy with NAA (hsplitlora and its "
                                 "no-iwi, no-armsc ablations).")  # fmt: skip
            aggregation = context.truncated_update  # the time model prices what it sends
        check_update_rule(self.name, aggregation, adapters)
        self.aggregation, self.adapters = aggregation, adapters
        # Anchored adapters hold (B0, A0) beside their factors: the memory model counts them.
        self.context = replace(context, memory=context.memory.with_anchors(adapters == "anchor"))
        self.importance_at_last_plan: dict[str, float] | None = None

    def update_rule(self, context: StrategyContext) -> tuple[Aggregation, str]:
        """How the fed server combines uploads and what the adapters do across rounds under this
        context: the class's own pair unless a strategy's follows a setting."""
        return type(self).aggregation, type(self).adapters

    # -- what the loop and setup ask ---------------------------------------------------------------
    @classmethod
    def arrange(cls, shards: list[list[int]], devices: list[DeviceProfile], local_steps: int,
                server: DeviceProfile) -> Arrangement:  # fmt: skip
        """Who trains on what (`server`: the main server's machine): every client on its shard."""
        return Arrangement(shards, devices, local_steps)

    @classmethod
    def crosses_cut(cls) -> bool:
        """Whether clients and a main server exchange what crosses a cut (activations, gradients,
        labels): the model is split and federated clients train it. Only then do budgets limit a
        client's memory (the others' is reported beside them)."""
        return cls.splits and not cls.centralised

    @classmethod
    def trains_on_clients(cls) -> bool:
        """Whether the clients train on their own devices (a centralised reference trains one
        trainer on the pooled data instead): only then can a client's budget be too small for it."""
        return not cls.centralised

    def measures_importance(self) -> bool:
        """Whether the clients measure IWI's importance during their steps (it plans by it)."""
        return self.uses_importance

    def warms_up(self) -> bool:
        """Whether round 1's importance comes from a warm-up step (one batch per client on the
        frozen model): for a strategy that plans by importance, unless the user fixed the ranks."""
        return self.uses_importance and self.context.fixed_ranks is None

    def sample(self, seed: int, round_: int, clients: int, per_round: int | None) -> list[int] | None:
        """The round's training clients: `per_round` of the `clients`, drawn from (seed, round) so a
        resumed run draws the same; None (every client) when `per_round` is None."""
        return None if per_round is None else sample_clients(seed, round_, clients, per_round)

    def aggregates(self) -> bool:
        """Whether the fed server combines the round's uploads (one central trainer has none)."""
        return True

    def round_plans(self, clients: list[ClientPlan], round_: int, tail_blocks: int | None) -> list[RoundPlan]:
        """The messages that start a round: each client's cut and ranks, what its adapters do across
        rounds, and full fine-tuning's learning rate where every weight is trained."""
        lr = self.context.full_finetune_lr if self.full_finetune else None
        return [RoundPlan(c.client, round_, c.split_point, c.all_ranks(), tail_blocks, self.adapters, lr, c.recompute)
                for c in clients]  # fmt: skip

    @classmethod
    def export_format(cls) -> str:
        """What the final model.safetensors holds: every weight (full), or the candidates' merged
        weights (candidates)."""
        return "full" if cls.full_finetune else "candidates"

    @property
    def budgets(self) -> list[int]:
        return [d.budget_bytes for d in self.context.devices]

    @property
    def server_share(self) -> int:
        """The main server's memory per client, M_S / m: only the m clients that train at once hold
        activations and adapters there (m = K without client sampling). The other K - m clients'
        server-side adapters and optimizer state wait for their next draw; they are not counted
        (they could wait in host memory; the main server role keeps them in place today)."""
        c = self.context
        return c.server_budget // (c.clients_per_round or len(c.devices))

    def validation_client(self, plan: Plan) -> int | None:
        """Whose adapters take part in validation and export: none when the weights hold the whole
        update (merged, or anchored adapters right after aggregation); else, for adapters that
        carry the update, the client holding the most of it (the largest total rank)."""
        if self.adapters != "overwrite" or self.full_finetune:
            return None
        return max(plan.clients, key=lambda c: (sum(c.all_ranks().values()), -c.client)).client

    def round_time(self, clients: list[ClientPlan]) -> float:
        """The round time the time model predicts for these client plans under this strategy's
        aggregation (what the update sent down costs)."""
        return max(self.round_times(clients))

    def round_times(self, clients: list[ClientPlan]) -> list[float]:
        """Every client's predicted path and then the main server's busy time (`round_time` is the
        largest)."""
        c = self.context
        if c.workload is None:
            raise ValueError("this strategy was built without a workload to predict round times")
        devices = [c.devices[p.client] for p in clients]
        return predicted_times(c.memory, clients, devices, c.workload, self.aggregation, self.adapters == "anchor",
                               c.clients_per_round)  # fmt: skip

    def plan(self, importance: Mapping[str, float] | None) -> Plan:
        raise NotImplementedError

    def wants_replan(self, round_: int, importance: Mapping[str, float] | None) -> bool:
        """Plan at round 1; later only when the importance ranking moved beyond delta."""
        if self.importance_at_last_plan is None:
            return True
        if not self.uses_importance or importance is None:
            return False
        return should_replan(importance, self.importance_at_last_plan, self.context.replan_delta)

    def resume_cuts(self, split_points: list[int]) -> None:
        """On resume: the cuts the run kept (strategies that choose cuts once remember them)."""

    def make_plan(self, importance: Mapping[str, float] | None) -> Plan:
        result = self.fixed_or_planned(importance)
        self.importance_at_last_plan = dict(importance or {})
        return result

    def initial_cuts(self) -> list[int]:
        """Each client's split point at the first plan (uniform importance): what a device loads.
        Every strategy keeps its cuts across re-plans."""
        planned = self.fixed_or_planned(dict.fromkeys(self.context.memory.candidates, 1.0))
        return [p.split_point for p in sorted(planned.clients, key=lambda p: p.client)]

    def fixed_or_planned(self, importance: Mapping[str, float] | None) -> Plan:
        """The strategy's plan, with what the user fixed: a fixed cut replaces planning (at rank 8
        unless a rank is fixed too); a fixed rank alone goes on every candidate at the planned
        cut, or on every matrix for whole-model strategies."""
        c = self.context
        fixed_ranks = c.fixed_ranks or [DEFAULT_RANK] * len(c.devices)
        if c.fixed_split_points is not None and self.splits:
            return self.fixed_plan(c.fixed_split_points, fixed_ranks)
        planned = self.plan(importance)
        if c.fixed_ranks is None or self.full_finetune:
            return planned
        if not self.splits:
            return self.unsplit_plan(fixed_ranks[: len(planned.clients)])
        return self.fixed_plan([p.split_point for p in sorted(planned.clients, key=lambda p: p.client)], fixed_ranks)

    # -- helpers shared by subclasses -----------------------------------------------------------
    def fixed_plan(self, split_points: list[int], ranks: list[int]) -> Plan:
        """Every candidate of every client (and of the server for it) at one rank per client."""
        memory = self.context.memory
        clients = []
        for cid, (split_point, rank) in enumerate(zip(split_points, ranks, strict=True)):
            client_ranks = dict.fromkeys(memory.client_side(split_point), rank)
            server_ranks = dict.fromkeys(memory.server_side(split_point), rank)
            clients.append(client_plan(cid, self.budgets[cid], split_point, client_ranks, server_ranks, memory,
                                       self.context.rho))  # fmt: skip
        shallowest = min(split_points)
        return Plan(clients, self.context.server_budget, memory.server_frozen_bytes(shallowest), self.context.levels,
                    tail_blocks=memory.tail_blocks, sharing=self.context.clients_per_round)  # fmt: skip

    def unsplit_plan(self, ranks: list[int]) -> Plan:
        """Every client runs the whole model (split point L) with one rank on every candidate;
        its memory is reported, not limited by its budget (method.md section 7)."""
        memory = self.context.memory
        clients = []
        for cid, rank in enumerate(ranks):
            client_ranks = dict.fromkeys(memory.candidates, rank)
            clients.append(ClientPlan(
                cid, self.budgets[cid] if cid < len(self.budgets) else 0, memory.num_blocks, client_ranks,
                memory.unsplit_bytes(client_ranks, self.full_finetune), {}, 0,
            ))  # fmt: skip
        return Plan(clients, self.context.server_budget, 0, self.context.levels)
