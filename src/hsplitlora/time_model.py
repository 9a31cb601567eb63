"""The simulated wall-clock of a round (method.md section 5):

    client i: E steps of FLOPs_client / F_i + (bytes of h + bytes of dL/dh) / beta_i,
              plus the adapter upload and the update download / beta_i
    main server: sum over clients of FLOPs_server / F_S (it is shared)
    U-shaped split: the client's FLOPs add its last t blocks and the head, the server's lose them,
    and a step's bytes are the four messages (h and dL/dh at both cuts)
    round = max(slowest client's path, server busy time)
    planning under client sampling (m of K train each round): the expected round,
              max(slowest client's path over all K, (m / K) x the server busy time of all K)

FLOPs per token: 4 P for a frozen matrix of P weights (forward, and backward to its input only),
6 P for a trained adapter (forward, input and weight gradients); the head 4 d V. Under DP-SGD
(the memory model's `per_example`) each adapter of rank r on a d_in x d_out matrix adds
r (2 d_in + 4 d_out): every example's gradients of A and B again, from its input, its x A^T and the
gradient at its output (privacy/dp.py: 2 r (d_in + d_out)), and that gradient through B once more
(2 r d_out). Clipping and noise cost a few FLOPs per adapter weight per example and step, not per
token, and the activations' noise a few per value at the cut: both are left out. A client that
recomputes its front blocks' activations (memory.py, `recompute`) runs their forward twice: 2 P
more per frozen matrix and 2 per adapter weight of the front.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hsplitlora.devices import DeviceProfile
from hsplitlora.method.aggregation import Aggregation, ExactChange
from hsplitlora.method.memory import MemoryModel
from hsplitlora.method.planner import ClientPlan


@dataclass
class ClientRoundWork:
    tokens: int  # tokens processed this round
    step_bytes: int  # activations + gradients over the round
    adapter_bytes: int  # adapter upload + update download


def adapter_params(memory: MemoryModel, ranks: dict[str, int]) -> int:
    return sum(r * (memory.candidates[n].d_in + memory.candidates[n].d_out) for n, r in ranks.items())


def adapter_flops_per_token(memory: MemoryModel, ranks: dict[str, int]) -> float:
    """A token's FLOPs in the adapters of `ranks`: 6 per weight, and DP-SGD's per-example gradients."""
    flops = 6 * adapter_params(memory, ranks)
    if memory.per_example:
        flops += sum(r * (2 * memory.candidates[n].d_in + 4 * memory.candidates[n].d_out) for n, r in ranks.items())
    return flops


def client_flops_per_token(memory: MemoryModel, plan: ClientPlan, vocab_size: int, hidden_size: int) -> float:
    block_params = memory.block_bytes / memory.dtype_bytes
    blocks = min(memory.client_blocks(plan.split_point), memory.num_blocks)
    head = 4 * hidden_size * vocab_size if memory.u_shaped or plan.split_point >= memory.num_blocks else 0
    flops = 4 * blocks * block_params + head + adapter_flops_per_token(memory, plan.ranks)
    if plan.recompute:  # the front's forward again in backward: 2 per frozen weight and adapter weight
        front = {n: r for n, r in plan.ranks.items() if memory.candidates[n].block < plan.split_point}
        flops += 2 * plan.split_point * block_params + 2 * adapter_params(memory, front)
    return flops


def server_flops_per_token(memory: MemoryModel, plan: ClientPlan, vocab_size: int, hidden_size: int) -> float:
    block_params = memory.block_bytes / memory.dtype_bytes
    head = 0 if memory.u_shaped else 4 * hidden_size * vocab_size
    blocks = memory.server_blocks(plan.split_point)
    return 4 * blocks * block_params + head + adapter_flops_per_token(memory, plan.server_ranks)


def round_time(
    memory: MemoryModel,
    plans: Sequence[ClientPlan],
    devices: Sequence[DeviceProfile],
    work: Sequence[ClientRoundWork],
    server_flops: float,
    vocab_size: int,
    hidden_size: int,
) -> dict:
    """{"round_s", "client_s": [...], "server_busy_s"} for one round."""
    client_seconds, server_busy = [], 0.0
    for plan, device, done in zip(plans, devices, work, strict=True):
        per_token = client_flops_per_token(memory, plan, vocab_size, hidden_size)
        if plan.split_point < memory.num_blocks:  # split: the main server runs the rest
            server_busy += done.tokens * server_flops_per_token(memory, plan, vocab_size, hidden_size) / server_flops
        compute = done.tokens * per_token / device.flops
        transfer = (done.step_bytes + done.adapter_bytes) / device.bandwidth
        client_seconds.append(compute + transfer)
    return {"round_s": max([*client_seconds, server_busy]), "client_s": client_seconds, "server_busy_s": server_busy}


@dataclass(frozen=True)
class Workload:
    """What a round is expected to do, for planning (measured rounds use `ClientRoundWork`):
    E steps of `tokens_per_step` real tokens in batches padded to `padded_tokens_per_step`; where
    the clients' data are known apart (`per_client`, by client id), each client's own means."""

    steps: int
    tokens_per_step: float
    padded_tokens_per_step: float
    hidden_size: int
    vocab_size: int
    server_flops: float
    cut_value_bytes: float = 4.0  # bytes per activation or gradient value across the cut (compression)
    update_value_bytes: float = 4.0  # bytes per value of the update sent down
    per_client: tuple[tuple[float, float], ...] | None = None  # (tokens, padded tokens) per step, by client

    def tokens(self, client: int) -> tuple[float, float]:
        """(real, padded) tokens per step of `client`'s batches."""
        if self.per_client is not None and 0 <= client < len(self.per_client):
            return self.per_client[client]
        return self.tokens_per_step, self.padded_tokens_per_step


def update_values(
    memory: MemoryModel, plans: Sequence[ClientPlan], aggregation: Aggregation, anchored: bool,
    receiver: ClientPlan | None = None,
) -> dict:  # fmt: skip
    """Values sent down per candidate after a round, as the strategy's aggregation sends them
    (NAA: the stacked change without the receiver's own term, or the dense matrix, whichever the
    whole stack makes smaller; SVD-EF: rank-k factors; the averaging rules: factors at the largest
    rank trained on the candidate). `receiver`: the client it goes to (None: one holding no term)."""
    return _values(memory, trained_ranks(plans), aggregation, anchored, receiver)


def trained_ranks(plans: Sequence[ClientPlan]) -> dict[str, list[int]]:
    """Every candidate's ranks over the clients that train it."""
    ranks: dict[str, list[int]] = {}
    for plan in plans:
        for name, rank in plan.all_ranks().items():
            if rank:
                ranks.setdefault(name, []).append(rank)
    return ranks


def _values(
    memory: MemoryModel, ranks: dict[str, list[int]], aggregation: Aggregation, anchored: bool,
    receiver: ClientPlan | None, names: Sequence[str] | None = None,
) -> dict:  # fmt: skip
    own = receiver.all_ranks() if receiver is not None else {}
    values = {}
    for name in ranks if names is None else [n for n in names if n in ranks]:
        shape = memory.candidates[name]
        values[name] = aggregation.values_down(shape.d_in, shape.d_out, ranks[name], anchored, own.get(name, 0))
    return values


def predicted_times(
    memory: MemoryModel,
    plans: Sequence[ClientPlan],
    devices: Sequence[DeviceProfile],
    workload: Workload,
    aggregation: Aggregation | None = None,
    anchored: bool = False,
    sharing: int | None = None,
) -> list[float]:
    """Every client's predicted path, then the main server's (expected) busy time, for a plan before
    it runs (the round is the largest): E steps per client, each
    crossing the cut with h and dL/dh (four tensors in a U-shaped split), then the client-side
    factors up and the update of every candidate it holds down.

    `sharing` m < K (client sampling): each client trains in a round with probability m / K, so the
    main server's expected busy time is (m / K) times its busy time over all K; the client path is
    still the slowest of all K, not an expected maximum over m: the plan holds for every round and
    any client may be drawn (over R rounds the slowest is left out of all with probability
    (1 - m/K)^R), so a plan that counts on its absence would be slow whenever it is drawn."""
    crossings = 4 if memory.u_shaped else 2
    ranks = trained_ranks(plans)
    work = []
    for plan in plans:
        split = plan.split_point < memory.num_blocks
        tokens, padded = workload.tokens(plan.client)
        step_bytes = crossings * padded * workload.hidden_size * workload.cut_value_bytes
        held = memory.client_side(plan.split_point) if split else list(memory.candidates)
        down = _values(memory, ranks, aggregation or ExactChange(), anchored, plan, held)
        up = 4 * adapter_params(memory, plan.ranks)
        adapters = up + workload.update_value_bytes * sum(down.values())
        work.append(ClientRoundWork(
            int(workload.steps * tokens), int(workload.steps * step_bytes) if split else 0,
            int(adapters),
        ))  # fmt: skip
    timing = round_time(memory, plans, devices, work, workload.server_flops, workload.vocab_size,
                        workload.hidden_size)  # fmt: skip
    share = 1.0 if sharing is None or sharing >= len(plans) else sharing / len(plans)
    return [*timing["client_s"], timing["server_busy_s"] * share]
