"""The setup of a run, built once from its config: the model with LoRA attached, the memory
model, the devices, the data and its shards, the strategy, the fed server and the engine that
moves messages between the roles. `rounds.run` builds it; split-training tests and benchmarks
build it through `fixed_federation`, which configures its clients at their fixed cuts and ranks
and reaches the roles directly."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

import torch

from hsplitlora.checks import check
from hsplitlora.config import DEFAULT_RANK, FLOWER, INPROCESS, RAY, RunConfig
from hsplitlora.data.e2e import Batch, collate
from hsplitlora.data.sources import load_training_data
from hsplitlora.devices import DeviceProfile, resolve_devices
from hsplitlora.engines.hosts import client_role, server_role
from hsplitlora.engines.inprocess import InProcessEngine
from hsplitlora.engines.spec import host_spec
from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import Candidate, attach_lora, wrap_frozen_linears
from hsplitlora.method.aggregation import TruncatedChange
from hsplitlora.method.memory import MemoryModel, check_ranks, measure_memory_model
from hsplitlora.method.sampling import per_round
from hsplitlora.models.architectures import architecture_of, hidden_size
from hsplitlora.models.loading import LoadedModel, load_model
from hsplitlora.models.split import check_split_point, check_tail_blocks
from hsplitlora.placement import Placement
from hsplitlora.privacy.dp import NO_DP, DPSettings, planned_settings
from hsplitlora.privacy.floor import floor_s_min
from hsplitlora.roles.client import Client
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import RoundPlan
from hsplitlora.strategies import STRATEGIES, StrategyContext
from hsplitlora.strategies.base import Strategy
from hsplitlora.time_model import Workload
from hsplitlora.units import parse_bytes

CENTRAL_BANDWIDTH = 1e12  # the centralised references move no data between machines


@dataclass
class Setup:
    """Everything the rounds need."""

    config: RunConfig
    engine: object  # InProcessEngine or RayEngine: the same interface
    strategy: Strategy
    memory: MemoryModel
    devices: list[DeviceProfile]
    server_budget: int
    shards: list[list[int]]
    num_blocks: int
    candidates: dict[str, Candidate]
    model: torch.nn.Module
    val_batches: list[Batch]
    fixed_ranks: list[int] | None
    steps_per_round: int
    notes: list[str] = field(default_factory=list)  # about the data, said once when the run starts
    data_description: str = ""
    started: float = 0.0  # perf_counter when the run began
    dp: DPSettings = NO_DP  # the run's differential privacy, a target epsilon calibrated to a sigma

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model.config)


def run_memory(memory: MemoryModel, config: RunConfig) -> MemoryModel:
    """The measured memory model as this run holds the model: its split mode, quantized blocks,
    recomputation and DP-SGD's per-example gradients."""
    memory = memory.with_tail(config.tail).with_quant(config.client_quant, config.server_quant)
    return memory.with_recompute(config.recompute).with_per_example(config.dp_sgd, config.dp_batches > 1)


def build_setup(config: RunConfig, where: Placement, loaded: LoadedModel | None = None) -> Setup:
    """Load, measure, read and place everything a run needs (every bad value is a sentence here,
    before anything is trained or written)."""
    loaded = loaded or load_model(config.model, seed=config.seed, dtype=config.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = architecture_of(model)
    candidates = attach_lora(model, config.targets)
    if config.client_quant != "none" or config.server_quant != "none":
        wrap_frozen_linears(model)
    num_blocks = arch.num_blocks(model)
    check_tail_blocks(config.tail, num_blocks)
    check_positions(model, config.max_seq_len)
    memory = run_memory(measure_memory_model(model, candidates, config.batch_size, config.max_seq_len), config)
    devices = resolve_devices(config.clients, config.budgets, config.device_preset, config.devices)
    server_budget = parse_bytes(config.server_budget)

    data = load_training_data(config, tokenizer)
    encoded, shards, validation, notes = data.items, data.shards, data.validation, list(data.notes)
    strategy_class = STRATEGIES[config.strategy]
    arranged = strategy_class.arrange(shards, devices, config.local_steps,
                                      DeviceProfile(server_budget, config.server_flops, CENTRAL_BANDWIDTH))  # fmt: skip
    shards, devices, steps_per_round = arranged.shards, arranged.devices, arranged.steps_per_round
    workload = expected_workload(config, model, [encoded[i] for shard in shards for i in shard], tokenizer.pad_token_id,
                                 [[encoded[i] for i in shard] for shard in shards])  # fmt: skip
    check_logical_batch(config, shards)
    if arranged.note:
        notes.append(arranged.note)
    val_batches = [collate(validation[i : i + config.batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(validation), config.batch_size)]  # fmt: skip

    fixed_splits = config.split_points(num_blocks) if config.split_point is not None else None
    for split_point in fixed_splits or []:
        check_split_point(split_point, num_blocks, config.tail)
    fixed_ranks = config.per_client("rank") if config.rank is not None else None
    check_ranks(memory, fixed_ranks or [], config.rank_levels)
    if fixed_splits is not None and fixed_ranks is None:
        fixed_ranks = [DEFAULT_RANK] * len(shards)  # a fixed cut alone keeps the foundation's default rank
    s_min, floor_note = floor_s_min(config, memory.deepest_split_point)  # the privacy floor, if any
    if floor_note:
        notes.append(floor_note)
    for split_point in fixed_splits or []:
        if split_point < s_min:
            raise UsageError(f"split_point {split_point} is below the privacy floor: {floor_note}")
    # m clients share the main server each round: the planner gives each M_S / m and expects m / K of its busy time.
    sharing = per_round(config.clients_per_round, len(devices))
    strategy = build_strategy(config, memory, devices, server_budget, s_min, workload,
                              sharing if sharing < len(devices) else None, fixed_splits, fixed_ranks)  # fmt: skip
    memory = strategy.context.memory  # with the anchors the strategy's adapters keep
    fed_server = FedServer(strategy.aggregation, config.compression)
    # Cuts follow the budgets, not importance: a uniform plan tells each Ray actor which blocks to
    # load, and where round 1's importance is measured.
    cuts = strategy.initial_cuts()
    # DP's steps per client at most: every round's local steps (and round 1's warm-up step, which
    # sends activations but trains nothing).
    warmup = 1 if strategy.warms_up() else 0
    dp = planned_settings(config, [len(s) for s in shards], config.rounds * steps_per_round,
                          config.rounds * steps_per_round + warmup)  # fmt: skip
    if dp.activations or dp.sgd:
        notes.append(dp_note(dp))
    spec = host_spec(config, tokenizer.pad_token_id, num_blocks, where, dp)  # what every role is built from
    # The importance warm-up runs the first cuts without adapters: a client recomputes there where
    # its cut fits its budget only so, as its plan will.
    warmup_recompute = [memory.recomputes(s, device.budget_bytes, config.rho) if s < num_blocks else False
                        for s, device in zip(cuts, devices, strict=False)]  # fmt: skip
    if config.engine == RAY:
        from hsplitlora.engines.ray_engine import RayEngine

        shard_items = [[encoded[i] for i in shard] for shard in shards]
        engine = RayEngine(spec, shard_items, cuts, candidates, fed_server, config.ray_address,
                           config.ray_client_resources, config.ray_server_resources)  # fmt: skip
        engine.quantized = config.client_quant != "none" or config.server_quant != "none"
    elif config.engine == FLOWER:
        from hsplitlora.engines.flower_engine import FlowerEngine, run_values

        engine = FlowerEngine(spec, run_values(config), cuts, candidates, fed_server, len(shards))
        engine.quantized = config.client_quant != "none" or config.server_quant != "none"
    else:
        # Each client and the main server hold the same `Cut` of that client.
        clients = [client_role(spec, cid, [encoded[i] for i in shard], candidates) for cid, shard in enumerate(shards)]
        server = server_role(spec, candidates, {client.client_id: client.cut for client in clients})
        # Placed once: the clients' copy, and the main server's own copy when it computes elsewhere.
        server_model = copy.deepcopy(model).to(where.server) if where.separate else None
        model.to(where.client)
        engine = InProcessEngine(model, arch, candidates, clients, server, fed_server, server_model, cuts, config.tail)
        set_quant(engine, config.client_quant, config.server_quant)
    engine.warmup_recompute = warmup_recompute
    return Setup(config, engine, strategy, memory, devices, server_budget, shards, num_blocks, candidates, model,
                 val_batches, fixed_ranks, steps_per_round, notes, data.description, dp=dp)  # fmt: skip


@dataclass
class Federation:
    """A run's setup in this process with its roles reached directly: what split-training tests
    and benchmarks step, inspect and change (`fixed_federation` builds it)."""

    setup: Setup
    loaded: LoadedModel

    @property
    def engine(self) -> InProcessEngine:
        return self.setup.engine

    @property
    def candidates(self) -> dict[str, Candidate]:
        return self.setup.candidates

    @property
    def clients(self) -> list[Client]:
        return [host.client for host in self.engine.transport.clients]

    @property
    def server(self) -> MainServer:
        return self.engine.transport.server.server


def fixed_federation(config: RunConfig, loaded: LoadedModel | None = None) -> Federation:
    """`build_setup` in this process on the CPU, every client configured for round 1 at its fixed
    cut (`split_point`, by default spread evenly; U-shaped when `config.split_mode` is u) with its
    fixed rank (default DEFAULT_RANK) on every candidate of the client and of the server for it: no
    planner, no rounds; the engine's steps, aggregation and validation are the caller's to call."""
    check(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    loaded = loaded or load_model(config.model, seed=config.seed, dtype=config.dtype)
    num_blocks = architecture_of(loaded.model).num_blocks(loaded.model)
    config = replace(config, engine=INPROCESS, split_point=config.split_points(num_blocks))
    cpu = torch.device("cpu")
    setup = build_setup(config, Placement(cpu, cpu), loaded)
    cuts = config.split_points(num_blocks)
    memory, budgets = setup.memory, [device.budget_bytes for device in setup.devices]

    def recomputes(cid: int, split_point: int, rank: int) -> bool:
        return memory.recomputes(
            split_point, budgets[cid], config.rho, dict.fromkeys(memory.client_side(split_point), rank)
        )

    setup.engine.configure([RoundPlan(cid, 1, s, dict.fromkeys(setup.candidates, r), config.tail,
                                      recompute=recomputes(cid, s, r))
                            for cid, (s, r) in enumerate(zip(cuts, setup.fixed_ranks, strict=True))])  # fmt: skip
    return Federation(setup, loaded)


def build_strategy(
    config: RunConfig, memory: MemoryModel, devices: list[DeviceProfile], server_budget: int, s_min: int,
    workload: Workload | None, sharing: int | None = None, fixed_splits: list[int] | None = None,
    fixed_ranks: list[int] | None = None,
) -> Strategy:  # fmt: skip
    """`config.strategy` for these devices (the trainers its `arrange` gave), the one way a run's
    setup and `plan` build it: the config's planning and update settings, the privacy floor's
    `s_min`, and `sharing` m, the clients that train and share the main server each round (None:
    every one)."""
    truncated = TruncatedChange(config.update_rank, config.update_energy) if config.update_form == "svd-ef" else None
    context = StrategyContext(
        memory, devices, server_budget, tuple(config.rank_levels), config.rho, s_min, config.replan_delta,
        fixed_splits, fixed_ranks, config.split_rule, config.adapter_lifecycle, workload, sharing, truncated,
        config.ft_lr, config.rank_time_slack,
    )  # fmt: skip
    return STRATEGIES[config.strategy](context)


def check_logical_batch(config: RunConfig, shards: list[list[int]]) -> None:
    """DP-SGD's logical batch holds each example at most once: it must fit every client's shard."""
    if not config.dp_sgd or config.dp_batches == 1:
        return
    smallest = min(range(len(shards)), key=lambda c: len(shards[c]))
    examples = config.dp_batches * config.batch_size
    if examples > len(shards[smallest]):
        raise UsageError(f"dp_batches {config.dp_batches} x batch_size {config.batch_size} = {examples} examples a "
                         f"DP-SGD step, more than client {smallest}'s shard of {len(shards[smallest])}; choose "
                         f"dp_batches of at most {max(len(shards[smallest]) // config.batch_size, 1)}.")  # fmt: skip


def dp_note(dp: DPSettings) -> str:
    """One line on the run's differential privacy."""
    kinds = []
    if dp.activations:
        kinds.append(f"activations at the cut clipped to {dp.activation_clip:g} with noise sigma "
                     f"{dp.activation_sigma:.4g}")  # fmt: skip
    if dp.sgd:
        batches = f", a noisy step every {dp.sgd_batches} batches" if dp.sgd_batches > 1 else ""
        kinds.append(f"DP-SGD on the adapters, clip {dp.grad_clip:g}, noise sigma {dp.sgd_sigma:.4g}{batches}")
    return "differential privacy: " + "; ".join(kinds) + " (each client's epsilon is in summary.json)."


def set_quant(engine: InProcessEngine, client_quant: str, server_quant: str) -> None:
    """Clients compute their blocks from `client_quant` weights, the main server from `server_quant`.
    In one process they share the float weights (the master every merge goes into); each kind in
    use keeps a quantized copy of the blocks computed with it, re-quantized after each merge."""
    for host in engine.transport.clients:
        host.quant = client_quant
    engine.transport.server.quant = server_quant
    engine.quantized = client_quant != "none" or server_quant != "none"


def check_positions(model: torch.nn.Module, max_seq_len: int) -> None:
    """Learned absolute positions (GPT-2) end at n_positions: a longer sequence has no embedding;
    rotary models (Llama, Qwen2) were trained up to max_position_embeddings. Checked before any
    tensor of that length is built."""
    positions = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", None)
    if positions is not None and max_seq_len > positions:
        raise UsageError(
            f"max_seq_len {max_seq_len} exceeds the {positions} positions this model learned; use 1 to {positions}."
        )


def expected_workload(
    config: RunConfig, model: torch.nn.Module, items: list, pad_id: int, shards: list[list] | None = None
) -> Workload:
    """What a round is expected to do, for planning: E steps of batches like the clients' (mean
    real tokens per step, and mean padded length from 64 sample batches); with `shards` (each
    trainer's items), each one's own, since the longest examples may all sit on one client."""
    import numpy as np

    from hsplitlora.compression import VALUE_BYTES
    from hsplitlora.data.e2e import Batcher

    def per_step(examples: list) -> tuple[float, float]:
        lengths = [len(item.input_ids) for item in examples] or [config.max_seq_len]
        batcher = Batcher(examples, config.batch_size, pad_id, config.seed) if examples else None
        padded = [next(batcher).input_ids.numel() for _ in range(64)] if batcher else [config.batch_size * lengths[0]]
        return config.batch_size * float(np.mean(lengths)), float(np.mean(padded))

    tokens, padded = per_step(items)
    return Workload(
        steps=config.local_steps, tokens_per_step=tokens, padded_tokens_per_step=padded,
        hidden_size=hidden_size(model.config), vocab_size=model.config.vocab_size, server_flops=config.server_flops,
        cut_value_bytes=VALUE_BYTES[config.compression], update_value_bytes=VALUE_BYTES[config.compression],
        per_client=tuple(per_step(shard) for shard in shards) if shards is not None else None,
    )  # fmt: skip
