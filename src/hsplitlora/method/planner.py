"""Adaptive Rank and Model Splitting Configuration (ARMSC), method.md section 4.

For each client i with budget M_i:
  1. split point s_i (split_rule fastest, method.md section 4 revised): the cuts that minimise the
     predicted round time among those whose adapter-free memory fits (1 - rho) M_i on the client
     and M_S / m on the server (m the clients that train at once: K, or clients_per_round), chosen
     jointly; (split_rule deepest) the deepest s in [s_min, L-1]
     (U-shaped: [s_min, L-1-t]) with Mem_client(s, no adapters) <= (1 - rho) M_i;
  2. client-side ranks: from all-zero, repeatedly raise the candidate with the best
     I(W) (u(r') - u(r)) / (C(W, r') - C(W, r)),  u(r) = log2(1 + r),  r' the next level of Q,
     while the total stays within M_i (an upgrade that does not fit retires that candidate);
  3. server-side ranks for blocks [s_i, L): the same greedy within the main server's M_S / m.
  4. (rank_time_slack sigma, beyond method.md) ranks that cost round time: ranks may lengthen the
     predicted round by at most sigma over the same cuts with the smallest positive level of Q as
     the highest rank. Rank ceilings (a common one on the server side, one per client on its side)
     come down one level at a time, each time the one whose plan predicts the least times (the
     slowest first), until the round fits; the greedy of steps 2 and 3 fills each side under its
     ceiling.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from hsplitlora.errors import UsageError
from hsplitlora.method.memory import MemoryModel
from hsplitlora.units import format_bytes

DEFAULT_LEVELS = (0, 2, 4, 8, 16)


class InfeasibleClientError(UsageError):
    """A client's budget cannot hold even the shallowest allowed cut."""


@dataclass
class ClientPlan:
    client: int
    budget_bytes: int
    split_point: int
    ranks: dict[str, int]  # client-side candidates (blocks < split_point)
    predicted_bytes: int
    server_ranks: dict[str, int] = field(default_factory=dict)  # blocks >= split_point
    server_predicted_bytes: int = 0
    recompute: bool = False  # the client recomputes its front blocks' activations in backward

    @property
    def headroom_bytes(self) -> int:
        return self.budget_bytes - self.predicted_bytes

    def all_ranks(self) -> dict[str, int]:
        return {**self.ranks, **self.server_ranks}


@dataclass
class Plan:
    clients: list[ClientPlan]
    server_budget_bytes: int
    server_frozen_bytes: int
    levels: tuple[int, ...]
    left_out: list[int] = field(default_factory=list)  # clients whose budget holds no cut
    tail_blocks: int | None = None  # U-shaped split: every client also runs the last t blocks and the head
    sharing: int | None = None  # clients that share the main server at once (clients_per_round); None: all

    def to_state(self) -> dict:
        """Everything, losslessly (checkpoints); `to_dict` is the user-facing schema."""
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> Plan:
        state = dict(state)
        state["clients"] = [ClientPlan(**c) for c in state["clients"]]
        state["levels"] = tuple(state["levels"])
        return cls(**state)

    def client(self, client_id: int) -> ClientPlan:
        return next(c for c in self.clients if c.client == client_id)

    @property
    def server_share_bytes(self) -> int:
        """The main server's memory per client that trains at once (its budget over m, or K)."""
        return self.server_budget_bytes // max(self.sharing or len(self.clients) + len(self.left_out), 1)

    def to_dict(self) -> dict:
        per_client = self.server_share_bytes
        return {
            "clients": [
                {
                    key: value
                    for key, value in asdict(c).items()
                    if key not in ("server_ranks", "server_predicted_bytes")
                }
                for c in self.clients
            ],
            "server": {
                "budget_bytes": self.server_budget_bytes,
                "budget_per_client_bytes": per_client,
                "frozen_bytes": self.server_frozen_bytes,
                "clients": [
                    {"client": c.client, "ranks": c.server_ranks, "predicted_bytes": c.server_predicted_bytes}
                    for c in self.clients
                ],
            },
            "levels": list(self.levels),
            "left_out": self.left_out,
            "split_mode": "standard" if self.tail_blocks is None else "u",
            "tail_blocks": self.tail_blocks,
        }


def utility(rank: int) -> float:
    """u(r) = log2(1 + r): diminishing returns of rank."""
    return math.log2(1 + rank)


def allocate_ranks(
    names: Sequence[str],
    importance: Mapping[str, float],
    cost: Callable[[str, int], int],
    available_bytes: int,
    levels: Sequence[int] = DEFAULT_LEVELS,
) -> dict[str, int]:
    """The greedy of ARMSC: raise the best I(W) du/dC upgrade that fits in `available_bytes`;
    an upgrade that does not fit now never will (the budget only shrinks), so it retires its
    candidate. Ties go to the candidate listed first."""
    levels = sorted(levels)
    ranks = dict.fromkeys(names, levels[0])
    order = {name: i for i, name in enumerate(names)}
    heap: list[tuple[float, int, str]] = []

    def push(name: str) -> None:
        rank = ranks[name]
        position = levels.index(rank)
        if position + 1 == len(levels):
            return
        nxt = levels[position + 1]
        extra = cost(name, nxt) - cost(name, rank)
        gain = importance.get(name, 0.0) * (utility(nxt) - utility(rank)) / max(extra, 1)
        heapq.heappush(heap, (-gain, order[name], name))

    for name in names:
        push(name)
    left = available_bytes - sum(cost(name, rank) for name, rank in ranks.items())
    while heap:
        _, _, name = heapq.heappop(heap)
        rank = ranks[name]
        nxt = levels[levels.index(rank) + 1]
        extra = cost(name, nxt) - cost(name, rank)
        if extra > left:
            continue
        ranks[name] = nxt
        left -= extra
        push(name)
    return ranks


def choose_split_point(memory: MemoryModel, budget_bytes: int, rho: float, s_min: int) -> int | None:
    """The deepest s in [s_min, L-1] (U-shaped: [s_min, L-1-t]) whose adapter-free client memory
    fits (1 - rho) of the budget."""
    deepest = memory.deepest_split_point
    fitting = [s for s in range(s_min, deepest + 1)
               if adapter_free_bytes(memory, s, budget_bytes, rho) <= (1 - rho) * budget_bytes]  # fmt: skip
    return max(fitting) if fitting else None


def adapter_free_bytes(memory: MemoryModel, split_point: int, budget_bytes: int, rho: float) -> int:
    """A client's memory at this cut without adapters, recomputing its front where the memory
    model's `recompute` mode has it recompute there."""
    return memory.client_bytes(split_point, recompute=memory.recomputes(split_point, budget_bytes, rho))


def client_plan(
    client_id: int, budget: int, split_point: int, ranks: Mapping[str, int], server_ranks: Mapping[str, int],
    memory: MemoryModel, rho: float,
) -> ClientPlan:  # fmt: skip
    """A client's plan with these ranks, its memory predicted as it will run (recomputing where
    the cut or these ranks would not fit otherwise, under `recompute auto`)."""
    recompute = memory.recomputes(split_point, budget, rho, ranks)
    return ClientPlan(client_id, int(budget), split_point, dict(ranks),
                      memory.client_bytes(split_point, ranks, recompute), dict(server_ranks),
                      memory.server_bytes(split_point, server_ranks), recompute)  # fmt: skip


SPLIT_RULES = ("fastest", "deepest")


def _client_plan(
    client_id: int, budget: int, split_point: int, importance: Mapping[str, float], memory: MemoryModel,
    server_share: int, levels: Sequence[int], ceilings: tuple[int, int] | None, rho: float,
) -> ClientPlan:  # fmt: skip
    """Steps 2 and 3 of ARMSC at a given cut: the importance greedy on both sides of it, under
    `ceilings` (the highest rank on the client's side, on the server's; None: no ceiling). A
    client that recomputes its front keeps aside what one front block's adapters hold at once (at
    its highest rank) and pays only their weights and states for each."""
    client_top, server_top = ceilings or (max(levels), max(levels))
    client_levels = [q for q in levels if q <= client_top]
    server_levels = [q for q in levels if q <= server_top]
    available = budget - memory.client_bytes(split_point, recompute=False)
    cost = memory.adapter_bytes
    if memory.recomputes(split_point, budget, rho):
        available = (budget - memory.client_bytes(split_point, recompute=True)
                     - memory.recompute_reserve(split_point, max(client_levels)))  # fmt: skip

        def cost(name: str, rank: int) -> int:
            front = memory.candidates[name].block < split_point
            return memory.adapter_state_bytes(name, rank) if front else memory.adapter_bytes(name, rank)

    ranks = allocate_ranks(memory.client_side(split_point), importance, cost, available, client_levels)
    server_ranks = allocate_ranks(memory.server_side(split_point), importance, memory.adapter_bytes,
                                  server_share - memory.server_bytes(split_point), server_levels)  # fmt: skip
    return client_plan(client_id, budget, split_point, ranks, server_ranks, memory, rho)


def fastest_split_points(
    cuts: Sequence[Sequence[int]], plan_at: Callable[[int, int], ClientPlan],
    round_time: Callable[[list[ClientPlan]], float], start: Sequence[int] | None = None,
    round_times: Callable[[list[ClientPlan]], list[float]] | None = None,
) -> list[int]:  # fmt: skip
    """Coordinate descent over the clients' cuts (each from its feasible `cuts`), from the
    all-shallowest plan (or `start`), keeping a move only when it lowers the predicted round time;
    the cuts are chosen jointly because the main server's busy time is shared by all clients.
    With `round_times` (every client's path and the server's busy time) a move is kept when it
    lowers the times compared slowest first: the round, or at an equal round the next slowest, so
    a client that does not bound the round still moves where it relieves the server (or itself)."""
    times = round_times or (lambda plans: [round_time(plans)])

    def key(trial: list[int]) -> list[float]:
        return sorted(times([plan_at(k, s) for k, s in enumerate(trial)]), reverse=True)

    chosen = list(start) if start is not None else [options[0] for options in cuts]
    best = key(chosen)
    improved = True
    while improved:
        improved = False
        for i, options in enumerate(cuts):
            for split_point in options:
                if split_point == chosen[i]:
                    continue
                trial = chosen[:i] + [split_point] + chosen[i + 1 :]
                found = key(trial)
                if _lower(found, best):
                    chosen, best, improved = trial, found, True
    return chosen


def _lower(times: Sequence[float], than: Sequence[float]) -> bool:
    """Whether `times` (sorted, slowest first) are lower than `than`: at the first that differs by
    more than rounding."""
    for a, b in zip(times, than, strict=True):
        if a < b * (1 - 1e-9):
            return True
        if a > b * (1 + 1e-9):
            return False
    return False


def fit_ranks_to_time(
    cuts: Sequence[int], plan_at: Callable[[int, int, tuple[int, int]], ClientPlan],
    round_times: Callable[[list[ClientPlan]], list[float]], levels: Sequence[int], slack: float,
) -> tuple[list[ClientPlan], list[tuple[int, int]]]:  # fmt: skip
    """ARMSC's ranks at fixed `cuts`, lowered until they lengthen the predicted round by at most
    `slack` over the same cuts with the smallest positive level as every ceiling (the cheapest plan
    that still trains what memory allows; step 4). `round_times` gives every client's path and the
    main server's busy time; `plan_at(position, cut, (client ceiling, server ceiling))` the greedy's
    plan under rank ceilings. One ceiling comes down a level at a time, never below the smallest
    positive level: the server's (common to all clients) or one client's, whichever leaves the
    smallest times, compared slowest first (so a tie at the top still makes progress). Returns the
    plans and each client's (client, server) ceilings."""
    levels = sorted(levels)
    floor, top = min(q for q in levels if q > 0), levels[-1]
    bound = (1 + slack) * max(round_times([plan_at(i, s, (floor, floor)) for i, s in enumerate(cuts)]))
    client_tops, server_top = [top] * len(cuts), top

    def build(tops: list[int], server: int) -> list[ClientPlan]:
        return [plan_at(i, s, (tops[i], server)) for i, s in enumerate(cuts)]

    def lower(ceiling: int) -> int:
        return levels[levels.index(ceiling) - 1]

    current = build(client_tops, server_top)
    times = sorted(round_times(current), reverse=True)
    while times[0] > bound * (1 + 1e-9):
        moves = [(client_tops, lower(server_top))] if server_top > floor else []
        moves += [(client_tops[:i] + [lower(ceiling)] + client_tops[i + 1 :], server_top)
                  for i, ceiling in enumerate(client_tops) if ceiling > floor]  # fmt: skip
        if not moves:  # every ceiling at the floor: the reference plan itself
            break
        times, chosen = min((sorted(round_times(build(*move)), reverse=True), k) for k, move in enumerate(moves))
        client_tops, server_top = moves[chosen]
        current = build(client_tops, server_top)
    return current, [(top_, server_top) for top_ in client_tops]


def plan(
    importance: Mapping[str, float],
    budgets: Sequence[int],
    memory: MemoryModel,
    server_budget_bytes: int,
    levels: Sequence[int] = DEFAULT_LEVELS,
    rho: float = 0.25,
    s_min: int = 1,
    leave_out_infeasible: bool = False,
    split_rule: str = "deepest",
    round_time: Callable[[list[ClientPlan]], float] | None = None,
    split_points: Sequence[int] | None = None,
    alternatives: Sequence[Plan] = (),
    sharing: int | None = None,
    rank_time_slack: float | None = None,
    round_times: Callable[[list[ClientPlan]], list[float]] | None = None,
) -> Plan:
    """Split points and ranks for every client (and the main server's ranks per client).

    `split_rule` deepest: each client's deepest cut whose adapter-free memory fits (1 - rho) of
    its budget. fastest: the cuts (among those that fit the client's (1 - rho) M_i and the server's
    M_S / K) that minimise `round_time` of the whole plan, by coordinate descent from the
    all-shallowest cuts; the deepest-fit cuts and any `alternatives` (complete plans, such as
    SplitLoRA's uniform one) are candidates too, so the result never predicts a slower round than
    any of them. `split_points` fixes the cuts (re-planning keeps them). `sharing`: how many clients
    train at once under client sampling (m of K); the main server's budget is split among them,
    M_S / m each, since only the sampled clients hold activations and adapters there.
    `rank_time_slack` sigma (with `round_times`, every client's predicted path and the server's busy
    time): the ranks are lowered until they lengthen the predicted round by at most sigma over the
    chosen cuts at the smallest positive rank (`fit_ranks_to_time`); the fastest rule searches cuts
    with the greedy's ranks, then again under the fitted ceilings (up to three times, until the
    cuts stay), and fits the ranks of its result and of the deepest-fit cuts before comparing them
    with the alternatives (which fit their own)."""
    if not 1 <= s_min <= memory.deepest_split_point:
        tail = f" with a tail of {memory.tail_blocks} block(s)" if memory.u_shaped else ""
        raise UsageError(f"s_min {s_min} must be in [1, {memory.deepest_split_point}] for this model{tail}.")
    if not 0 <= rho < 1:
        raise UsageError(f"rho {rho} must be in [0, 1).")
    if sorted(set(levels)) != sorted(levels) or min(levels) != 0 or any(r < 0 for r in levels):
        raise UsageError(f"rank levels {list(levels)} must be distinct non-negative integers including 0.")
    if split_rule not in SPLIT_RULES:
        raise UsageError(f"split_rule {split_rule!r} is unknown; choose {' or '.join(SPLIT_RULES)}.")
    if split_rule == "fastest" and round_time is None and split_points is None:
        raise ValueError("split_rule fastest needs a round_time model")
    if rank_time_slack is not None and round_times is None:
        raise ValueError("rank_time_slack needs the round_times model")
    server_share = server_budget_bytes // max(sharing or len(budgets), 1)
    deepest: dict[int, int] = {}
    left_out = []
    for client_id, budget in enumerate(budgets):
        split_point = choose_split_point(memory, budget, rho, s_min)
        if split_point is not None:
            deepest[client_id] = split_point
            continue
        message = _infeasible(client_id, budget, memory, rho, s_min)
        if not leave_out_infeasible:
            raise InfeasibleClientError(message)
        warnings.warn(message + " It is left out.", stacklevel=2)
        left_out.append(client_id)
    members = sorted(deepest)
    cache: dict[tuple[int, int, tuple[int, int] | None], ClientPlan] = {}

    def plan_at(position: int, split_point: int, ceilings: tuple[int, int] | None = None) -> ClientPlan:
        key = (members[position], split_point, ceilings)
        if key not in cache:
            cache[key] = _client_plan(members[position], budgets[members[position]], split_point, importance, memory,
                                      server_share, levels, ceilings, rho)  # fmt: skip
        return cache[key]

    fits: dict[tuple[int, ...], tuple[list[ClientPlan], list[tuple[int, int]]]] = {}

    def fitted(cuts: Sequence[int]) -> tuple[list[ClientPlan], list[tuple[int, int]]]:
        """`fit_ranks_to_time` at these cuts, once per cuts."""
        if tuple(cuts) not in fits:
            fits[tuple(cuts)] = fit_ranks_to_time(cuts, plan_at, round_times, levels, rank_time_slack)
        return fits[tuple(cuts)]

    def plans_at(cuts: Sequence[int]) -> list[ClientPlan]:
        """The clients' plans at these cuts: the greedy's ranks, fitted to the round time if asked."""
        if rank_time_slack is None:
            return [plan_at(i, s) for i, s in enumerate(cuts)]
        return fitted(cuts)[0]

    def finish(clients: list[ClientPlan]) -> Plan:
        shallowest = min((c.split_point for c in clients), default=memory.deepest_split_point)
        return Plan(clients, int(server_budget_bytes), memory.server_frozen_bytes(shallowest), tuple(levels),
                    left_out, memory.tail_blocks, sharing)  # fmt: skip

    deepest_cuts = [deepest[c] for c in members]
    if split_points is not None:
        cuts = [split_points[c] for c in members]
    elif split_rule == "deepest" or not members:
        cuts = deepest_cuts
    else:
        options = [[s for s in range(s_min, deepest[c] + 1) if memory.server_bytes(s) <= server_share] or [deepest[c]]
                   for c in members]  # fmt: skip
        found = fastest_split_points(options, plan_at, round_time, round_times=round_times)
        for _ in range(3 if rank_time_slack is not None else 0):
            # Fitted ranks can move the bottleneck (a server relieved of rank FLOPs may now afford a
            # deeper client): the cuts are searched again under the fitted ceilings, until they stay.
            ceilings = fitted(found)[1]
            again = fastest_split_points(options, lambda i, s, tops=ceilings: plan_at(i, s, tops[i]), round_time,
                                         start=found, round_times=round_times)  # fmt: skip
            if again == found:
                break
            found = again
        contenders = [finish(plans_at(cuts)) for cuts in (found, deepest_cuts)]
        contenders += [a for a in alternatives if [c.client for c in a.clients] == members]
        return min(contenders, key=lambda candidate: round_time(candidate.clients))
    return finish(plans_at(cuts))


def _infeasible(client_id: int, budget: int, memory: MemoryModel, rho: float, s_min: int) -> str:
    options = {False: memory.client_bytes(s_min, recompute=False), True: memory.client_bytes(s_min, recompute=True)}
    recompute = memory.recompute == "on" or (memory.recompute == "auto" and options[True] < options[False])
    needed = options[recompute]
    lacking = math.ceil(needed / (1 - rho) - budget)
    recomputing = ", recomputing the blocks' activations in backward" if recompute else ""
    tail = f" and the U-shaped tail ({memory.tail_blocks} block(s), head and loss)" if memory.u_shaped else ""
    return (
        f"client {client_id} cannot take part: its budget of {format_bytes(budget)} lacks "
        f"{format_bytes(lacking)} to hold even {s_min} block(s){tail} (needs "
        f"{format_bytes(needed)} for weights and activations{recomputing}, which must "
        f"stay within {1 - rho:.0%} of the budget)."
    )
