"""How a call reaches a host. The round protocol (engines/protocol.py) is written once against
this interface; the in-process transport calls hosts directly, the Ray transport
(engines/ray_engine.py) sends the call to an actor and can lose and restart one."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hsplitlora.engines.hosts import ClientHost, ServerHost
from hsplitlora.errors import UsageError
from hsplitlora.roles.messages import RoundPlan


class Transport:
    """The hosts and the way to reach them. `clients[cid]` and `server` are called as the hosts
    they stand for (`ClientHost`, `ServerHost`): the hosts themselves here, whose calls return
    values; under Ray handles whose calls return references to them (see `get`)."""

    clients: list[ClientHost]
    server: ServerHost | None
    lost: tuple[type[Exception], ...] = ()  # what a call raises when its host is gone
    can_lose_hosts = False

    def get(self, reference):
        """The value behind a host call's result (a list of them for a list)."""
        return reference

    def owners(self, live: Sequence[int]) -> list:
        """The hosts that each hold a copy of the weights: those a merge or a weight load must reach."""
        raise NotImplementedError

    def copies(self, live: Sequence[int]) -> list[tuple[Any, list[int | None], bool]]:
        """Each owner with the roles whose adapters its copy holds (client ids; None: the main
        server) and whether its copy holds every block: what the update sent to it may leave out."""
        raise NotImplementedError

    def check_plans(self, plans: Sequence[RoundPlan]) -> None:
        """Refuse plans this transport cannot follow (nothing by default)."""

    def server_alive(self) -> bool:
        return True

    def restart_client(self, cid: int) -> None:
        raise NotImplementedError

    def restart_server(self) -> None:
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release what the transport holds (nothing in one process)."""


class InProcessTransport(Transport):
    """Every host an object in this process sharing the model's modules, so a merge or a weight
    load is applied once to the shared copy (and once to the main server's own copy when it
    computes on another device)."""

    def __init__(self, clients: Sequence[ClientHost], server: ServerHost):
        self.clients = list(clients)
        self.server = server

    def owners(self, live: Sequence[int]) -> list:
        separate = self.server.model is not self.clients[0].model
        return [self.clients[0]] + ([self.server] if separate else [])

    def copies(self, live: Sequence[int]) -> list[tuple[Any, list[int | None], bool]]:
        # The shared copy carries every client's adapters (and the server's unless it has its own).
        separate = self.server.model is not self.clients[0].model
        shared = [*live] + ([] if separate else [None])
        return [(self.clients[0], shared, True)] + ([(self.server, [None], True)] if separate else [])


class SeparateHostsTransport(Transport):
    """Hosts in other processes (Ray actors, Flower nodes): each client loaded only its own blocks
    once, for the cut it was given, and the main server its own; so every living host owns a copy
    of the weights, holds only its own adapters, and no cut may move during the run."""

    engine = ""  # its name, for the sentence that refuses a moved cut
    split_points: list[int]

    def owners(self, live: Sequence[int]) -> list:
        return [self.clients[cid] for cid in live] + ([self.server] if self.server is not None else [])

    def copies(self, live: Sequence[int]) -> list[tuple[Any, list[int | None], bool]]:
        server = [(self.server, [None], False)] if self.server is not None else []
        return [(self.clients[cid], [cid], False) for cid in live] + server

    def check_plans(self, plans: Sequence[RoundPlan]) -> None:
        if [p.split_point for p in plans] != self.split_points:
            raise UsageError(f"the {self.engine} engine keeps each client's cut for the whole run (clients load "
                             "their blocks once); this plan moves a cut.")  # fmt: skip
