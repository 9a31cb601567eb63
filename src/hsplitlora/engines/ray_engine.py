"""The Ray engine: the round protocol of engines/protocol.py over Ray actors. Every client is an
actor holding only its data shard and its blocks (loaded alone from the weights file), the main
server an actor holding the blocks from the shallowest cut on and the head; the fed server
aggregates in the driver. The hosts are the in-process ones; only the moving of messages differs.
Activations, gradients, adapters and updates cross through Ray's object store; nothing else is
shared. In a U-shaped split a client actor also loads the last t blocks, the final norm and the
head, the server actor only the middle blocks.

What is Ray's alone: starting actors (and starting them again when one is lost), reaching them,
and knowing that a lost actor raised; the protocol decides what a lost host means."""

from __future__ import annotations

import _thread
import os
import signal
import socket
import threading
from collections.abc import Sequence
from contextlib import suppress
from typing import cast

import torch

from hsplitlora.data.e2e import Encoded
from hsplitlora.engines.hosts import ClientHost, ServerHost, client_blocks, client_role, server_role
from hsplitlora.engines.protocol import Engine
from hsplitlora.engines.spec import HostSpec
from hsplitlora.engines.transport import SeparateHostsTransport
from hsplitlora.errors import UsageError
from hsplitlora.lora.attach import attach_lora, wrap_frozen_linears
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import load_part, place
from hsplitlora.roles.fed_server import FedServer


def _load(spec: HostSpec, blocks: Sequence[int], embedding: bool, head: bool, device: str):
    """A partial model on `device` (the modules it does not hold stay on meta), its architecture
    and the candidates in its blocks."""
    torch.set_num_threads(spec.threads or 1)
    loaded = load_part(spec.model, blocks, embedding=embedding, head=head, seed=spec.seed, with_tokenizer=False,
                       dtype=spec.dtype)  # fmt: skip
    model = place(loaded.model, torch.device(device))
    candidates = {n: c for n, c in attach_lora(model, spec.targets).items() if c.block in blocks}
    if spec.client_quant != "none" or spec.server_quant != "none":
        wrap_frozen_linears(model)  # as in one process: every block's linear weights can be quantized
    return model, architecture_of(model), candidates


class ClientActor(ClientHost):
    """A client host that loaded only its blocks (a Ray actor, or a Flower node's host)."""

    def __init__(self, spec: HostSpec, client_id: int, items: list[Encoded], split_point: int, local: bool):
        tail = None if local else spec.tail_blocks
        blocks = client_blocks(split_point, spec.num_blocks, tail)
        model, arch, candidates = _load(spec, blocks, embedding=True, head=local or tail is not None,
                                        device=spec.client_device)  # fmt: skip
        super().__init__(model, arch, candidates, client_role(spec, client_id, items, candidates))
        self.quant = spec.client_quant  # its float blocks stay the master merges go into


class ServerActor(ServerHost):
    """The main server's host holding the blocks from the shallowest cut on (a Ray actor, or the
    Flower driver's)."""

    def __init__(self, spec: HostSpec, shallowest_split: int):
        tail = spec.tail_blocks  # U-shaped: the server holds only the middle
        end = spec.num_blocks - (tail or 0)
        model, arch, candidates = _load(spec, range(shallowest_split, end), embedding=False, head=tail is None,
                                        device=spec.server_device)  # fmt: skip
        super().__init__(model, arch, candidates, server_role(spec, candidates))
        self.quant = spec.server_quant


CONNECT_TIMEOUT_S = 10.0


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """One sentence within `timeout_s` when nothing accepts a connection at a Ray address
    (`host:port` or `ray://host:port`; `auto` and `local` are Ray's to resolve)."""
    if address in ("auto", "local"):
        return
    host, colon, port = address.removeprefix("ray://").rpartition(":")
    host = host.strip("[]")  # an IPv6 address in brackets
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"ray_address {address!r} is not host:port (like 10.0.0.5:6379) or ray://host:port.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise UsageError(
            f"no Ray cluster answers at {address} within {timeout_s:g} s ({error.strerror or error}); start one "
            f"there (ray start --head --port {port}) or leave out ray_address to start a local one."
        ) from None


JOIN_TIMEOUT_S = 20.0  # Ray's own connection loop adds up to 30 s before Python can stop it


def join_within(ray, address: str, timeout_s: float) -> None:
    """ray.init(address) that gives up, with one sentence, when the cluster has not answered in
    `timeout_s` (something listens at the port, but no Ray head Ray can reach there)."""
    gave_up = threading.Event()

    def give_up() -> None:
        gave_up.set()
        _thread.interrupt_main()  # raised in ray.init's loop, the next time it runs Python

    timer = threading.Timer(timeout_s, give_up)
    timer.daemon = True
    timer.start()
    try:
        ray.init(address=address, log_to_driver=False)
    except KeyboardInterrupt:
        if not gave_up.is_set():
            raise
        with suppress(Exception):
            ray.shutdown()
        raise UsageError(
            f"the Ray cluster at {address} accepted a connection but did not answer within {timeout_s:g} s; check "
            "that it is the head node's address (ray status prints it) and that Ray reaches it from this machine."
        ) from None
    finally:
        timer.cancel()


def start_ray(address: str | None) -> bool:
    """Join the cluster at `address`, or start a local instance sized to this machine listening on
    localhost only; whether this run started Ray (and so shuts it down)."""
    import ray

    if ray.is_initialized():
        return False
    # ray.init installs its own SIGTERM handler (it exits 15 at once); the run's own handler stops it
    # as Ctrl-C does, saying how to resume, so it is put back.
    main_thread = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main_thread else None
    if address:
        check_reachable(address)  # ray.init retries an address nobody answers at forever
        join_within(ray, address, JOIN_TIMEOUT_S)
    else:
        ray.init(num_cpus=os.cpu_count(), object_store_memory=512 * 2**20, include_dashboard=False,
                 log_to_driver=False, _node_ip_address="127.0.0.1")  # fmt: skip
    if main_thread and handler is not None:
        signal.signal(signal.SIGTERM, handler)
    return True


class RayMethod:
    """An actor's method called as the host's: `method(...)` is `method.remote(...)`, a reference."""

    def __init__(self, method):
        self.remote = method.remote

    def __call__(self, *args):
        return self.remote(*args)


class RayHandle:
    """An actor called as the host it runs (`ClientHost`, `ServerHost`): each method returns a
    reference, so the calls of a split step chain inside Ray without a stop in the driver."""

    def __init__(self, actor):
        self.actor = actor

    def __getattr__(self, name: str) -> RayMethod:
        return RayMethod(getattr(self.actor, name))


class RayTransport(SeparateHostsTransport):
    """Client and server actors, each reached through a `RayHandle`."""

    engine = "ray"
    can_lose_hosts = True

    def __init__(self, spec: HostSpec, shards: list[list[Encoded]], split_points: list[int], address: str | None,
                 client_resources: dict | None, server_resources: dict | None):  # fmt: skip
        import ray

        self.ray = ray
        self.owns_ray = start_ray(address)
        self.lost = (ray.exceptions.RayActorError, ray.exceptions.RayTaskError)
        self.spec, self.shards, self.split_points = spec, shards, list(split_points)
        self.local = [s >= spec.num_blocks for s in split_points]
        self.client_class = ray.remote(ClientActor).options(**(client_resources or {"num_cpus": 0}))
        self.server_options = server_resources or {"num_cpus": 0}  # e.g. {"num_gpus": 1} with server_device cuda
        self.clients = [self._start_client(cid) for cid in range(len(shards))]
        split = [s for s, local in zip(split_points, self.local, strict=True) if not local]
        self.shallowest = min(split) if split else None
        self.server = self._start_server() if split else None

    def _start_client(self, cid: int) -> ClientHost:
        actor = self.client_class.remote(self.spec, cid, self.shards[cid], self.split_points[cid], self.local[cid])
        return cast(ClientHost, RayHandle(actor))

    def _start_server(self) -> ServerHost:
        actor = self.ray.remote(ServerActor).options(**self.server_options).remote(self.spec, self.shallowest)
        return cast(ServerHost, RayHandle(actor))

    def get(self, reference):
        return self.ray.get(reference)

    def server_alive(self) -> bool:
        if self.server is None:
            return True
        try:
            self.ray.get(self.server.held_parameter_names())
            return True
        except self.ray.exceptions.RayActorError:
            return False

    def restart_client(self, cid: int) -> None:
        self.clients[cid] = self._start_client(cid)

    def restart_server(self) -> None:
        self.server = self._start_server()

    def shutdown(self) -> None:
        if self.owns_ray and self.ray.is_initialized():
            self.ray.shutdown()


class RayEngine(Engine):
    """The round protocol over Ray actors (see the module's docstring)."""

    def __init__(
        self, spec: HostSpec, shards: list[list[Encoded]], split_points: list[int], candidates: dict,
        fed_server: FedServer, address: str | None = None, client_resources: dict | None = None,
        server_resources: dict | None = None,
    ):  # fmt: skip
        transport = RayTransport(spec, shards, split_points, address, client_resources, server_resources)
        super().__init__(transport, candidates, fed_server, spec.num_blocks, spec.tail_blocks, split_points)
