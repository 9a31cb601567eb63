"""Models: loading (GGUF package, cache, local folders, tiny test models), architectures and the cut."""

from hsplitlora.models.architectures import Architecture, architecture_of
from hsplitlora.models.loading import load_model
from hsplitlora.models.split import ClientPart, ServerPart, split_model

__all__ = ["Architecture", "ClientPart", "ServerPart", "architecture_of", "load_model", "split_model"]
