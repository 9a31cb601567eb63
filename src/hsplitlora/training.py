"""Builds clients and the main server from a config and runs split LoRA training steps."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hsplitlora.config import RunConfig
from hsplitlora.data.e2e import Batcher, data_file, encode, partition_iid, read_e2e
from hsplitlora.engines.inprocess import InProcessEngine
from hsplitlora.lora.attach import Candidate, attach_lora
from hsplitlora.lora.layer import MultiLoRALayer
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import LoadedModel, load_model
from hsplitlora.models.split import ClientPart, ServerPart, check_split_point
from hsplitlora.roles.client import Client
from hsplitlora.roles.main_server import MainServer


@dataclass
class Federation:
    loaded: LoadedModel
    candidates: dict[str, Candidate]
    clients: list[Client]
    server: MainServer
    engine: InProcessEngine
    shard_sizes: list[int] = field(default_factory=list)


def create_adapters(
    model: torch.nn.Module,
    candidates: dict[str, Candidate],
    adapter: str,
    ranks: dict[str, int],
    alpha: float,
    generator: torch.Generator,
) -> None:
    """(Re)create adapter `adapter` on every candidate with its rank (0: none), fresh."""
    for name, candidate in candidates.items():
        layer = model.get_submodule(candidate.module)
        assert isinstance(layer, MultiLoRALayer)
        layer.set_adapter(adapter, candidate.slot, ranks.get(name, 0), alpha, generator)


def build_federation(config: RunConfig, loaded: LoadedModel | None = None) -> Federation:
    """Load the model and data, cut the model per client and give each client and the main
    server their adapters (one uniform rank per client, as configured)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    loaded = loaded or load_model(config.model, seed=config.seed)
    model, tokenizer = loaded.model, loaded.tokenizer
    arch = architecture_of(model)
    candidates = attach_lora(model, config.targets)
    num_blocks = arch.num_blocks(model)
    split_points = config.split_points(num_blocks)
    ranks = config.per_client("rank")
    for split_point in split_points:
        check_split_point(split_point, num_blocks)

    examples = read_e2e(data_file(config.data_dir, "train"))
    encoded = [encode(example, tokenizer, config.max_seq_len) for example in examples]
    shards = partition_iid(len(encoded), config.clients, config.seed)

    clients, server_parts = [], {}
    for cid, (split_point, rank, shard) in enumerate(zip(split_points, ranks, shards, strict=True)):
        generator = torch.Generator().manual_seed(config.seed * 100_003 + cid)
        create_adapters(model, candidates, f"client{cid}", dict.fromkeys(candidates, rank), config.alpha, generator)
        batches = Batcher([encoded[i] for i in shard], config.batch_size, tokenizer.pad_token_id, config.seed + cid)
        clients.append(Client(cid, ClientPart(arch, model, split_point), batches, config.lr))
        server_parts[cid] = ServerPart(arch, model, split_point)
    server = MainServer(server_parts, config.lr)
    return Federation(loaded, candidates, clients, server, InProcessEngine(clients, server), [len(s) for s in shards])


def train_steps(
    federation: Federation,
    steps: int,
    on_step: Callable[[int, list[float]], None] | None = None,
) -> list[list[float]]:
    """Run `steps` local steps of every client; returns the losses, one list per step."""
    history = []
    for step in range(steps):
        losses = [gradient.loss for gradient in federation.engine.step_all()]
        history.append(losses)
        if on_step is not None:
            on_step(step, losses)
    return history
