"""The roles of split learning: clients and the main server, talking only through messages."""

from hsplitlora.roles.client import Client
from hsplitlora.roles.main_server import MainServer
from hsplitlora.roles.messages import ActivationGradient, Activations

__all__ = ["ActivationGradient", "Activations", "Client", "MainServer"]
