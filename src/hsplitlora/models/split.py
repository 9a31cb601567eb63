"""The cut: a client part (embeddings, blocks [0, s)) and a server part (blocks [s, L), final norm,
LM head). Both parts reference the model's own modules, so cutting copies no frozen weight."""

from __future__ import annotations

import torch
from torch import nn

from hsplitlora.errors import UsageError
from hsplitlora.models.architectures import Architecture, architecture_of


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids for right-padded batches: 0..T-1 on every row (padding sits after the text)."""
    return torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)


class ClientPart(nn.Module):
    """Embeddings and the first `split_point` blocks; returns the activations sent to the server."""

    def __init__(self, arch: Architecture, model: nn.Module, split_point: int):
        super().__init__()
        self.arch = arch
        self.split_point = split_point
        self.embedding = arch.embedding(model)
        self.context = arch.block_context(model)
        all_blocks = arch.blocks(model)
        self.blocks = nn.ModuleList(all_blocks[i] for i in range(split_point))
        self.block_indices = list(range(split_point))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        position_ids = positions(attention_mask)
        hidden = self.embedding(input_ids, position_ids)
        context = self.context(hidden, attention_mask, position_ids)
        for block in self.blocks:
            hidden = self.context.call_block(block, hidden, context)
        return hidden


class ServerPart(nn.Module):
    """Blocks [split_point, L), the final norm and the LM head; returns logits."""

    def __init__(self, arch: Architecture, model: nn.Module, split_point: int):
        super().__init__()
        self.arch = arch
        self.split_point = split_point
        self.context = arch.block_context(model)
        all_blocks = arch.blocks(model)
        self.blocks = nn.ModuleList(all_blocks[i] for i in range(split_point, len(all_blocks)))
        self.block_indices = list(range(split_point, len(all_blocks)))
        self.head = arch.head(model)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        context = self.context(hidden, attention_mask, positions(attention_mask))
        for block in self.blocks:
            hidden = self.context.call_block(block, hidden, context)
        return self.head(hidden)


def check_split_point(split_point: int, num_blocks: int) -> None:
    if not isinstance(split_point, int) or not 1 <= split_point <= num_blocks - 1:
        raise UsageError(
            f"split point {split_point} is out of range; this model has {num_blocks} blocks, "
            f"so a split point must be in [1, {num_blocks - 1}]."
        )


def split_model(model: nn.Module, split_point: int) -> tuple[ClientPart, ServerPart]:
    """Cut `model` after block `split_point - 1`; valid split points are [1, L-1]."""
    arch = architecture_of(model)
    check_split_point(split_point, arch.num_blocks(model))
    return ClientPart(arch, model, split_point), ServerPart(arch, model, split_point)
