"""A federation with a fixed cut and rank per client (no planner, no aggregation): the building
block for split-training experiments, tests and benchmarks. Rounds live in rounds.py."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hsplitlora.checks import check
from hsplitlora.config import DEFAULT_RANK, RunConfig
from hsplitlora.data.e2e import client_batchers
from hsplitlora.engines.inprocess import InProcessEngine
from hsplitlora.lora.attach import Candidate, attach_lora
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import LoadedModel, load_model
from hsplitlora.models.split import check_split_point
from hsplitlora.placement import Placement
from hsplitlora.privacy.dp import DPSettings, planned_settings
from hsplitlora.roles.client import Client
from hsplitlora.roles.cut import Cut
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import RoundPlan


@dataclass
class Federation:
    loaded: LoadedModel
    candidates: dict[str, Candidate]
    clients: list[Client]
    server: MainServer
    engine: InProcessEngine
    shard_sizes: list[int] = field(default_factory=list)


def make_roles(
    config: RunConfig,
    candidates: dict[str, Candidate],
    encoded: list,
    shards: list[list[int]],
    pad_id: int,
    placement: Placement | None = None,
    dp: DPSettings | None = None,
) -> tuple[list[Client], MainServer]:
    """One client per shard (its examples, its seeded batch order) and the main server, each on
    its device; each client and the main server hold the same `Cut` of that client. `dp`: the
    run's differential privacy (default: the config's sigmas as given)."""
    where = placement or Placement(torch.device("cpu"), torch.device("cpu"))
    dp = dp if dp is not None else planned_settings(config, [len(s) for s in shards], 0, 0)
    clients = []
    for cid, shard in enumerate(shards):
        batches, warmup = client_batchers([encoded[i] for i in shard], config.batch_size, pad_id, config.seed, cid)
        clients.append(Client(cid, batches, candidates, config.lr, config.alpha, config.seed, config.compression,
                              where.client, warmup, Cut(config.compression), dp))  # fmt: skip
    cuts = {client.client_id: client.cut for client in clients}
    server = MainServer(candidates, config.lr, config.alpha, config.seed, config.compression, where.server, cuts, dp)
    return clients, server


def build_federation(config: RunConfig, loaded: LoadedModel | None = None) -> Federation:
    """Load the model and data, cut the model at each client's fixed split point (U-shaped when
    `config.split_mode` is u) and give every candidate of every client (client and server side)
    the client's fixed rank (default DEFAULT_RANK)."""
    check(config)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    loaded = loaded or load_model(config.model, seed=config.seed, dtype=config.dtype)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = architecture_of(model)
    candidates = attach_lora(model, config.targets)
    split_points = config.split_points(arch.num_blocks(model))
    for split_point in split_points:
        check_split_point(split_point, arch.num_blocks(model), config.tail)
    ranks = config.per_client("rank") if config.rank is not None else [DEFAULT_RANK] * config.clients

    from hsplitlora.data.sources import load_training_data

    data = load_training_data(config, tokenizer)  # E2E by default, or the config's own data
    encoded, shards = data.items, data.shards
    clients, server = make_roles(config, candidates, encoded, shards, tokenizer.pad_token_id)
    engine = InProcessEngine(model, arch, candidates, clients, server, cuts=split_points, tail_blocks=config.tail)
    plans = zip(split_points, ranks, strict=True)
    engine.configure([RoundPlan(cid, 1, s, dict.fromkeys(candidates, r), config.tail)
                      for cid, (s, r) in enumerate(plans)])  # fmt: skip
    return Federation(loaded, candidates, clients, server, engine, [len(s) for s in shards])


def train_steps(
    federation: Federation,
    steps: int,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[list[float]]:
    """Run `steps` local steps of every client; returns the losses, one list per step."""
    return federation.engine.local_steps(steps, on_step)
