"""From a model and device budgets to a plan: the memory model at the batch shape, importance
(a warm-up pass over a few training batches, or uniform), then ARMSC."""

from __future__ import annotations

from dataclasses import dataclass, replace

from hsplitlora.config import RunConfig
from hsplitlora.data.e2e import Batcher, data_file, encode_many, read_e2e
from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import Candidate, attach_lora
from hsplitlora.method.importance import importance, warmup_sums
from hsplitlora.method.memory import MemoryModel, check_ranks, measure_memory_model
from hsplitlora.method.planner import InfeasibleClientError, Plan, _infeasible
from hsplitlora.models.architectures import architecture_of, hidden_size
from hsplitlora.models.loading import LoadedModel
from hsplitlora.models.split import check_tail_blocks
from hsplitlora.privacy.floor import floor_s_min
from hsplitlora.setup import build_strategy, check_positions
from hsplitlora.strategies import Strategy
from hsplitlora.time_model import Workload

RUN = RunConfig()  # `plan` plans what `run` would, so its defaults are run's


@dataclass
class PlanRequest:
    budgets: list[int]
    server_budget: int
    batch_size: int = RUN.batch_size
    seq_len: int = RUN.max_seq_len
    targets: tuple[str, ...] = tuple(RUN.targets)
    levels: tuple[int, ...] = tuple(RUN.rank_levels)
    rho: float = RUN.rho
    s_min: int = RUN.s_min
    r_ref: int = RUN.r_ref
    uniform_importance: bool = False
    warmup_batches: int = RUN.warmup_batches
    data_dir: str | None = None
    leave_out_infeasible: bool = False
    seed: int = RUN.seed
    tail_blocks: int | None = None  # plan a U-shaped split keeping the last t blocks on every client
    split_rule: str = RUN.split_rule  # as `hsplitlora run` cuts: fastest (time model) or deepest (memory only)
    rank_time_slack: float | None = RUN.rank_time_slack  # ranks may lengthen the predicted round this much
    local_steps: int = RUN.local_steps  # E, for the time model
    server_flops: float = RUN.server_flops
    client_quant: str = RUN.client_quant  # clients' blocks held as int8 / nf4: more of them fit a budget
    server_quant: str = RUN.server_quant
    recompute: str = RUN.recompute  # clients recompute their blocks' activations: deeper cuts fit a budget
    clients_per_round: int | None = None  # m of K train each round and share the main server (None: all)
    model: str = RUN.model
    split_mode: str = RUN.split_mode
    max_leakage: float | None = None  # the privacy floor: cuts whose measured leakage is at most this
    leakage_curve: str | None = None
    dp_sgd: bool = False  # DP-SGD's per-example gradients take memory
    dp_batches: int = 1  # and its clipped sums, when a step spans several batches

    @classmethod
    def from_config(cls, config: RunConfig, uniform_importance: bool = False,
                    leave_out_infeasible: bool = False) -> PlanRequest:  # fmt: skip
        """What `run` with this (validated) config would plan: `plan` and `run` share one validation."""
        from hsplitlora.devices import resolve_devices
        from hsplitlora.method.sampling import per_round
        from hsplitlora.units import parse_bytes

        devices = resolve_devices(config.clients, config.budgets, config.device_preset, config.devices)
        return cls(
            budgets=[device.budget_bytes for device in devices], server_budget=parse_bytes(config.server_budget),
            batch_size=config.batch_size, seq_len=config.max_seq_len, targets=tuple(config.targets),
            levels=tuple(config.rank_levels), rho=config.rho, s_min=config.s_min, r_ref=config.r_ref,
            uniform_importance=uniform_importance, warmup_batches=config.warmup_batches, data_dir=config.data_dir,
            leave_out_infeasible=leave_out_infeasible, seed=config.seed, tail_blocks=config.tail,
            split_rule=config.split_rule, rank_time_slack=config.rank_time_slack, local_steps=config.local_steps,
            server_flops=config.server_flops,
            client_quant=config.client_quant, server_quant=config.server_quant, recompute=config.recompute,
            clients_per_round=per_round(config.clients_per_round, len(devices)) if config.clients_per_round else None,
            model=config.model, split_mode=config.split_mode, max_leakage=config.max_leakage,
            leakage_curve=config.leakage_curve, dp_sgd=config.dp_sgd, dp_batches=config.dp_batches,
        )  # fmt: skip


@dataclass
class PlanResult:
    plan: Plan
    memory: MemoryModel
    importance: dict[str, float]
    candidates: dict[str, Candidate]


def warmup_importance(
    loaded: LoadedModel, candidates: dict[str, Candidate], memory: MemoryModel, request: PlanRequest
) -> dict[str, float]:
    """Theta from `warmup_batches` training batches of the default data on the frozen model."""
    examples = read_e2e(data_file(request.data_dir, "train"))
    items = encode_many(examples[: 64 * request.warmup_batches], loaded.tokenizer, request.seq_len)
    batcher = Batcher(items, request.batch_size, loaded.tokenizer.pad_token_id, seed=request.seed)
    sums, batches = warmup_sums(loaded.model, candidates, [next(batcher) for _ in range(request.warmup_batches)])
    return importance(sums, batches, memory, request.r_ref)


def make_plan(loaded: LoadedModel, request: PlanRequest) -> PlanResult:
    candidates = attach_lora(loaded.model, request.targets)
    check_tail_blocks(request.tail_blocks, architecture_of(loaded.model).num_blocks(loaded.model))
    check_positions(loaded.model, request.seq_len)
    memory = measure_memory_model(loaded.model, candidates, request.batch_size, request.seq_len)
    check_ranks(memory, [], list(request.levels))
    memory = memory.with_tail(request.tail_blocks).with_anchors(True)  # hsplitlora's adapters keep an anchor
    memory = memory.with_quant(request.client_quant, request.server_quant).with_recompute(request.recompute)
    memory = memory.with_per_example(request.dp_sgd, request.dp_batches > 1)
    if request.uniform_importance:
        scores = dict.fromkeys(candidates, 1.0)
    else:
        scores = warmup_importance(loaded, candidates, memory, request)
    s_min, floor = floor_s_min(request, memory.deepest_split_point)  # the privacy floor, if any
    request = replace(request, s_min=s_min)
    strategy = planning_strategy(loaded, memory, request)
    memory = strategy.context.memory
    try:
        result = strategy.armsc(scores, leave_out_infeasible=request.leave_out_infeasible)
    except InfeasibleClientError as error:
        if floor is None:
            raise
        raise InfeasibleClientError(f"{error} The cut it needs is the {floor}") from None
    if not result.clients:  # every client left out: an empty plan would read as a plan
        largest = request.budgets.index(max(request.budgets))
        reason = _infeasible(largest, request.budgets[largest], memory, request.rho, request.s_min)
        raise UsageError(f"no client's budget holds a cut, so there is nothing to plan: {reason}")
    return PlanResult(result, memory, scores, candidates)


def planning_strategy(loaded: LoadedModel, memory: MemoryModel, request: PlanRequest) -> Strategy:
    """HSplitLoRA as `run` builds it for these budgets (setup.build_strategy): the default device
    speeds and links (what `run --budgets` gives), anchored adapters, and for the fastest split
    rule (or a rank_time_slack) E steps of batches like the training data's to predict round times with."""
    from hsplitlora.devices import DEFAULT_BANDWIDTH, DEFAULT_FLOPS, DeviceProfile

    settings = RunConfig(strategy="hsplitlora", rank_levels=list(request.levels), rho=request.rho,
                         split_rule=request.split_rule, rank_time_slack=request.rank_time_slack)  # fmt: skip
    devices = [DeviceProfile(budget, DEFAULT_FLOPS, DEFAULT_BANDWIDTH) for budget in request.budgets]
    timed = request.split_rule == "fastest" or request.rank_time_slack is not None
    workload = planning_workload(loaded, request) if timed else None
    return build_strategy(settings, memory, devices, request.server_budget, request.s_min, workload,
                          request.clients_per_round)  # fmt: skip


def planning_workload(loaded: LoadedModel, request: PlanRequest) -> Workload:
    """E steps of batches as long as the first 512 training examples are on average (unpadded)."""
    examples = read_e2e(data_file(request.data_dir, "train"))[:512]
    lengths = [len(item.input_ids) for item in encode_many(examples, loaded.tokenizer, request.seq_len)]
    tokens = request.batch_size * sum(lengths) / len(lengths)
    return Workload(
        steps=request.local_steps, tokens_per_step=tokens, padded_tokens_per_step=tokens,
        hidden_size=hidden_size(loaded.model.config), vocab_size=loaded.model.config.vocab_size,
        server_flops=request.server_flops,
    )  # fmt: skip
