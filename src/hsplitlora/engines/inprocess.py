"""The in-process engine: the round protocol of engines/protocol.py with every role an object in
this process and every message a function argument. Clients are logically parallel; the main
server interleaves their steps. Clients and the main server share the model's modules, so a merge
is applied once to the shared copy; when the main server computes on another device it holds a
copy of its own (`server_model`), which takes every merge too."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hsplitlora.engines.hosts import ClientHost, ServerHost
from hsplitlora.engines.protocol import Engine
from hsplitlora.engines.transport import InProcessTransport
from hsplitlora.lora.attach import Candidate
from hsplitlora.models.architectures import Architecture
from hsplitlora.roles.client import Client
from hsplitlora.roles.fed_server import FedServer
from hsplitlora.roles.main_server import MainServer


class InProcessEngine(Engine):
    def __init__(
        self,
        model: torch.nn.Module,
        arch: Architecture,
        candidates: dict[str, Candidate],
        clients: Sequence[Client],
        server: MainServer,
        fed_server: FedServer | None = None,
        server_model: torch.nn.Module | None = None,
        cuts: Sequence[int] | None = None,
        tail_blocks: int | None = None,
    ):
        hosts = [ClientHost(model, arch, candidates, client) for client in clients]
        server_host = ServerHost(server_model if server_model is not None else model, arch, candidates, server)
        transport = InProcessTransport(hosts, server_host)
        super().__init__(transport, candidates, fed_server, arch.num_blocks(model), tail_blocks, cuts)
