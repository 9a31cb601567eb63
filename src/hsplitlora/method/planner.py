"""Adaptive Rank and Model Splitting Configuration (ARMSC), method.md section 4.

For each client i with budget M_i:
  1. split point s_i = the deepest s in [s_min, L-1] (U-shaped: [s_min, L-1-t]) with
     Mem_client(s, no adapters) <= (1 - rho) M_i;
  2. client-side ranks: from all-zero, repeatedly raise the candidate with the best
     I(W) (u(r') - u(r)) / (C(W, r') - C(W, r)),  u(r) = log2(1 + r),  r' the next level of Q,
     while the total stays within M_i (an upgrade that does not fit retires that candidate);
  3. server-side ranks for blocks [s_i, L): the same greedy within the main server's M_S / K.
"""

from __future__ import annotations

import heapq
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from hsplitlora.errors import UsageError
from hsplitlora.method.memory import MemoryModel

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

    def to_dict(self) -> dict:
        per_client = self.server_budget_bytes // max(len(self.clients) + len(self.left_out), 1)
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
    fitting = [s for s in range(s_min, deepest + 1) if memory.client_bytes(s) <= (1 - rho) * budget_bytes]
    return max(fitting) if fitting else None


def plan(
    importance: Mapping[str, float],
    budgets: Sequence[int],
    memory: MemoryModel,
    server_budget_bytes: int,
    levels: Sequence[int] = DEFAULT_LEVELS,
    rho: float = 0.25,
    s_min: int = 1,
    leave_out_infeasible: bool = False,
) -> Plan:
    """Split points and ranks for every client (and the main server's ranks per client)."""
    if not 1 <= s_min <= memory.deepest_split_point:
        tail = f" with a tail of {memory.tail_blocks} block(s)" if memory.u_shaped else ""
        raise UsageError(f"s_min {s_min} must be in [1, {memory.deepest_split_point}] for this model{tail}.")
    if not 0 <= rho < 1:
        raise UsageError(f"rho {rho} must be in [0, 1).")
    if sorted(set(levels)) != sorted(levels) or min(levels) != 0 or any(r < 0 for r in levels):
        raise UsageError(f"rank levels {list(levels)} must be distinct non-negative integers including 0.")
    server_share = server_budget_bytes // max(len(budgets), 1)
    clients, left_out = [], []
    for client_id, budget in enumerate(budgets):
        split_point = choose_split_point(memory, budget, rho, s_min)
        if split_point is None:
            lacking = math.ceil(memory.client_bytes(s_min) / (1 - rho) - budget)
            tail = f" and the U-shaped tail ({memory.tail_blocks} block(s), head and loss)" if memory.u_shaped else ""
            message = (
                f"client {client_id} cannot take part: its budget of {format_bytes(budget)} lacks "
                f"{format_bytes(lacking)} to hold even {s_min} block(s){tail} (needs "
                f"{format_bytes(memory.client_bytes(s_min))} for weights and activations, which must "
                f"stay within {1 - rho:.0%} of the budget)."
            )
            if not leave_out_infeasible:
                raise InfeasibleClientError(message)
            warnings.warn(message + " It is left out.", stacklevel=2)
            left_out.append(client_id)
            continue
        client_side = memory.client_side(split_point)
        base = memory.client_bytes(split_point)
        ranks = allocate_ranks(client_side, importance, memory.adapter_bytes, budget - base, levels)
        server_side = memory.server_side(split_point)
        server_base = memory.server_bytes(split_point)
        server_ranks = allocate_ranks(server_side, importance, memory.adapter_bytes, server_share - server_base, levels)
        clients.append(
            ClientPlan(
                client=client_id,
                budget_bytes=int(budget),
                split_point=split_point,
                ranks=ranks,
                predicted_bytes=memory.client_bytes(split_point, ranks),
                server_ranks=server_ranks,
                server_predicted_bytes=memory.server_bytes(split_point, server_ranks),
            )
        )
    shallowest = min((c.split_point for c in clients), default=memory.deepest_split_point)
    return Plan(clients, int(server_budget_bytes), memory.server_frozen_bytes(shallowest), tuple(levels), left_out,
                memory.tail_blocks)  # fmt: skip


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}  # fmt: skip


def parse_bytes(text: str | int) -> int:
    """`800MB`, `1.5GB`, `2GiB`, `123456` -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool) and text > 0:
        return text
    raw = str(text).strip()
    lowered = raw.lower().replace(" ", "")
    number = lowered.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = lowered[len(number) :] or "b"
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _UNITS or not math.isfinite(value) or value <= 0:
        raise UsageError(
            f"budget {raw!r} is not a memory size; write a positive number with an optional unit, "
            "like 800MB, 1.5GB, 2GiB or 123456 (bytes)."
        )
    return int(value * _UNITS[unit])


def parse_budgets(text: str) -> list[int]:
    parts = str(text).split(",")
    if not all(part.strip() for part in parts):
        raise UsageError(f"budgets {text!r} has an empty entry; list memory sizes like 1.5GB,2GB,3GB.")
    return [parse_bytes(part) for part in parts]


def format_bytes(value: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(value) >= size:
            return f"{value / size:.1f} {unit}"
    return f"{int(value)} B"
