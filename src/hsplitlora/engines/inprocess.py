"""The in-process engine: every role is an object in this process and a message is a function
argument. Clients are logically parallel; the main server interleaves their steps."""

from __future__ import annotations

from collections.abc import Sequence

from hsplitlora.roles.client import Client
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import ActivationGradient


class InProcessEngine:
    def __init__(self, clients: Sequence[Client], server: MainServer):
        self.clients = list(clients)
        self.server = server
        self.bytes_up = {c.client_id: 0 for c in self.clients}
        self.bytes_down = {c.client_id: 0 for c in self.clients}

    def split_step(self, client: Client) -> ActivationGradient:
        """One split step: client forward -> activations -> server forward, loss, backward and
        update -> activation gradient -> client backward and update."""
        activations = client.forward()
        self.bytes_up[client.client_id] += activations.nbytes()
        gradient = self.server.step(activations)
        self.bytes_down[client.client_id] += gradient.nbytes()
        client.backward(gradient)
        return gradient

    def step_all(self) -> list[ActivationGradient]:
        """One local step of every client, interleaved on the main server."""
        return [self.split_step(client) for client in self.clients]
