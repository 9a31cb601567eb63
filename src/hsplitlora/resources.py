"""What this machine can hold: a run or an evaluation whose predicted memory exceeds the memory
available is refused before it starts, with both figures, instead of ending in the allocator."""

from __future__ import annotations

from pathlib import Path

from hsplitlora.errors import UsageError
from hsplitlora.units import format_bytes


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where the system does not say)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_fits(needed: int, what: str, remedy: str, available: int | None = None) -> None:
    """Refuse `needed` bytes when more than this machine has available."""
    available = available_memory() if available is None else available
    if available is not None and needed > available:
        raise UsageError(
            f"{what} needs about {format_bytes(needed)}, but this machine has {format_bytes(available)} available; "
            f"{remedy}"
        )


def simulation_bytes(memory, plan) -> int:
    """One process simulating every role (the in-process engine): the whole model, one split step's
    activations at a time (the model's depth of them) and every client's adapters on both sides."""
    adapters = sum(
        memory.adapter_bytes(name, rank)
        for client in plan.clients
        for name, rank in {**client.ranks, **client.server_ranks}.items()
    )
    return memory.unsplit_bytes() + adapters  # the whole model and one step's activations, once


def generation_bytes(model, batch_size: int, beams: int, prompt_tokens: int, new_tokens: int) -> int:
    """Beam search: the weights, the key/value cache of batch x beams sequences and their logits."""
    from hsplitlora.models.architectures import hidden_size

    config = model.config
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    hidden = hidden_size(config)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    value_bytes = next(model.parameters()).element_size()
    sequences = batch_size * beams
    cache = 2 * layers * kv_heads * head_dim * sequences * (prompt_tokens + new_tokens) * value_bytes
    logits = 3 * sequences * config.vocab_size * 4  # the step's logits, log-probabilities and scores
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return weights + cache + logits
