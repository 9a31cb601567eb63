"""Attach multi-tenant LoRA layers to a transformers model, per architecture, by module name."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn
from transformers.pytorch_utils import Conv1D

from hsplitlora.errors import UsageError
from hsplitlora.lora.layer import MAIN_SLOT, MultiLoRALayer
from hsplitlora.models.architectures import architecture_of


@dataclass(frozen=True)
class Candidate:
    """One candidate matrix W (d_out x d_in) of one block: where it lives and its shape."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj" or "transformer.h.3.attn.c_attn.q"
    block: int
    kind: str  # q, k, v, o, gate, up, down
    module: str  # path of the MultiLoRALayer in the model
    local_module: str  # its path inside the block
    slot: str
    d_in: int
    d_out: int


def attach_lora(model: nn.Module, targets: Iterable[str]) -> dict[str, Candidate]:
    """Wrap every target module of every block in a MultiLoRALayer (idempotent) and return the
    candidate matrices, ordered by block then target, keyed by name."""
    arch = architecture_of(model)
    targets = list(targets)
    unknown = [t for t in targets if t not in arch.targets]
    if unknown:
        raise UsageError(
            f"target {unknown[0]!r} does not exist in {arch.name} models; valid targets are {', '.join(arch.targets)}."
        )
    candidates: dict[str, Candidate] = {}
    for block_index, block in enumerate(arch.blocks(model)):
        for kind in targets:
            target = arch.targets[kind]
            layer = block.get_submodule(target.module)
            if not isinstance(layer, MultiLoRALayer):
                layer = MultiLoRALayer(layer, arch.slot_sizes(target.module, layer))
                block.set_submodule(target.module, layer)
            module_path = f"{arch.blocks_path}.{block_index}.{target.module}"
            slot = target.slot or MAIN_SLOT
            name = module_path if target.slot is None else f"{module_path}.{target.slot}"
            lo, hi = layer.slot_bounds[slot]
            candidates[name] = Candidate(
                name, block_index, kind, module_path, target.module, slot, layer.in_features, hi - lo
            )
    return candidates


def wrap_frozen_linears(model: nn.Module) -> None:
    """Wrap every other nn.Linear and Conv1D of every block (the MLP when only q, k, v, o are
    targets) in an adapter-less MultiLoRALayer, so a quantized part computes all its block's
    products from quantized weights. Only when quantizing: their parameter names gain `.base`."""
    for block in architecture_of(model).blocks(model):
        for name, module in list(block.named_modules()):
            inside = any(name.startswith(f"{wrapped}.") for wrapped, m in block.named_modules()
                         if isinstance(m, MultiLoRALayer))  # fmt: skip
            if isinstance(module, nn.Linear | Conv1D) and not inside:
                block.set_submodule(name, MultiLoRALayer(module))


def lora_layers(module: nn.Module) -> list[MultiLoRALayer]:
    return [m for m in module.modules() if isinstance(m, MultiLoRALayer)]


def set_active_adapter(module: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one used by every LoRA layer inside `module` (None: base only)."""
    for layer in lora_layers(module):
        layer.active_adapter = name


def detach_lora(model: nn.Module) -> nn.Module:
    """Put every wrapped module's base back in place (adapters dropped; merge them first)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALayer):
            model.set_submodule(name, module.base)
    return model
