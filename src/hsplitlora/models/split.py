"""The cut: a client part (embeddings, blocks [0, s)) and a server part (blocks [s, L), final norm,
LM head). Both parts reference the model's own modules, so cutting copies no frozen weight.

The U-shaped split (`split_mode: u`) cuts twice: the client keeps the embeddings and blocks
[0, s) (`UClientPart.front`) and also the last t blocks, the final norm and the head
(`UClientPart.tail`); the main server runs only the middle, blocks [s, L - t). Token ids, labels
and logits never leave the client."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from hsplitlora.errors import UsageError
from hsplitlora.models.architectures import Architecture, architecture_of


def weights_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a part's frozen weights: what activations arriving at it are cast to (adapters
    are float32 whatever it is)."""
    for name, param in module.named_parameters():
        if "lora_" not in name and param.is_floating_point():
            return param.dtype
    return torch.float32


def set_quant(blocks: nn.Module, kind: str) -> None:
    """Make every LoRA layer in `blocks` compute W x as `kind` (none, int8, nf4) from now on."""
    from hsplitlora.lora.attach import lora_layers

    for layer in lora_layers(blocks):
        layer.quant = kind


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
        self.quant = "none"  # how this part's blocks compute W x: none, int8 or nf4 (client_quant)
        # Recompute each block's activations in backward, keeping only its input (the plan's
        # `recompute`): the same numbers with less memory and one more forward.
        self.recompute = False

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        set_quant(self.blocks, self.quant)  # shared blocks: another holder may compute them otherwise
        position_ids = positions(attention_mask)
        hidden = self.embedding(input_ids, position_ids)
        context = self.context(hidden, attention_mask, position_ids)
        recompute = self.recompute and torch.is_grad_enabled()
        for block in self.blocks:
            if recompute:
                hidden = checkpoint(self.context.call_block, block, hidden, context, use_reentrant=False)
            else:
                hidden = self.context.call_block(block, hidden, context)
        return hidden


class ServerPart(nn.Module):
    """Blocks [split_point, L), the final norm and the LM head: returns logits. With `end`, the
    middle of a U-shaped split: blocks [split_point, end) only, returning their activations."""

    def __init__(self, arch: Architecture, model: nn.Module, split_point: int, end: int | None = None):
        super().__init__()
        self.arch = arch
        self.split_point = split_point
        self.context = arch.block_context(model)
        all_blocks = arch.blocks(model)
        self.end = len(all_blocks) if end is None else end
        self.blocks = nn.ModuleList(all_blocks[i] for i in range(split_point, self.end))
        self.block_indices = list(range(split_point, self.end))
        self.head = arch.head(model) if end is None else None
        self.quant = "none"  # how this part's blocks compute W x (server_quant; client_quant for a client's tail)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        set_quant(self.blocks, self.quant)
        context = self.context(hidden, attention_mask, positions(attention_mask))
        for block in self.blocks:
            hidden = self.context.call_block(block, hidden, context)
        return hidden if self.head is None else self.head(hidden)


class UClientPart(nn.Module):
    """A U-shaped client's two ends: `front` (embeddings, blocks [0, s)) and `tail` (blocks
    [L - t, L), final norm, head). `blocks` and `block_indices` list both ends' blocks, so adapters,
    importance probes and merges treat the client's blocks as one set."""

    def __init__(self, arch: Architecture, model: nn.Module, split_point: int, tail_blocks: int):
        super().__init__()
        num_blocks = arch.num_blocks(model)
        self.arch = arch
        self.split_point = split_point
        self.tail_blocks = tail_blocks
        self.front = ClientPart(arch, model, split_point)
        self.tail = ServerPart(arch, model, num_blocks - tail_blocks)

    @property
    def blocks(self) -> list[nn.Module]:
        return [*self.front.blocks, *self.tail.blocks]

    @property
    def quant(self) -> str:
        return self.front.quant

    @quant.setter
    def quant(self, kind: str) -> None:
        self.front.quant = self.tail.quant = kind

    @property
    def block_indices(self) -> list[int]:
        return [*self.front.block_indices, *self.tail.block_indices]


def check_split_point(split_point: int, num_blocks: int, tail_blocks: int | None = None) -> None:
    """Valid cuts leave the main server at least one block: [1, L-1], or [1, L-1-t] when the client
    also keeps the last t blocks (U-shaped split)."""
    check_tail_blocks(tail_blocks, num_blocks)
    deepest = num_blocks - 1 - (tail_blocks or 0)
    if not isinstance(split_point, int) or not 1 <= split_point <= deepest:
        reason = f" and the client keeps the last {tail_blocks} for the U-shaped split" if tail_blocks else ""
        raise UsageError(
            f"split point {split_point} is out of range; this model has {num_blocks} blocks{reason}, "
            f"so a split point must be in [1, {deepest}]."
        )


def check_tail_blocks(tail_blocks: int | None, num_blocks: int) -> None:
    if tail_blocks is not None and not 0 <= tail_blocks <= num_blocks - 2:
        raise UsageError(
            f"tail_blocks {tail_blocks} is out of range; this model has {num_blocks} blocks, and the client's "
            f"front and the main server need one each, so tail_blocks must be in [0, {num_blocks - 2}]."
        )


def client_part(arch: Architecture, model: nn.Module, split_point: int, tail_blocks: int | None = None):
    """The client's side of a cut: blocks [0, s), and, U-shaped (`tail_blocks` t), also the tail."""
    if tail_blocks is None:
        return ClientPart(arch, model, split_point)
    return UClientPart(arch, model, split_point, tail_blocks)


def server_part(arch: Architecture, model: nn.Module, split_point: int, tail_blocks: int | None = None) -> ServerPart:
    """The main server's side of a cut: blocks [s, L) and the head, or, U-shaped, the middle only."""
    end = None if tail_blocks is None else arch.num_blocks(model) - tail_blocks
    return ServerPart(arch, model, split_point, end)


def split_model(
    model: nn.Module, split_point: int, tail_blocks: int | None = None
) -> tuple[ClientPart | UClientPart, ServerPart]:
    """Cut `model` after block `split_point - 1`; valid split points are [1, L-1]. With
    `tail_blocks` t, cut U-shaped: the client part also holds the last t blocks and the head."""
    arch = architecture_of(model)
    check_split_point(split_point, arch.num_blocks(model), tail_blocks)
    return client_part(arch, model, split_point, tail_blocks), server_part(arch, model, split_point, tail_blocks)
