"""Per-architecture knowledge: where the blocks, embeddings and head live, how a block is called,
and which module (and which slice of it) each candidate matrix is.

Three families are supported:
- the LLaMA family: LLaMA, SmolLM2, Qwen2, Qwen3, Mistral, OLMo 2, Gemma 2 and Gemma 3 share its
  module naming (`model.layers`, `self_attn.q_proj`, `mlp.gate_proj`, ...); what differs is read
  from the config (sliding-window and global layers mixed through `layer_types`, a rotary
  embedding per layer type for Gemma 3, the final logit soft-capping of Gemma) or lives inside
  the modules (Gemma's scaled embeddings, OLMo 2's and Qwen 3's norms);
- Phi-3: the same layout with fused `qkv_proj` ([q | k | v]) and `gate_up_proj` ([gate | up]),
  each split into slots so that every matrix is its own candidate;
- GPT-2 (fused `c_attn`, `Conv1D` weights, learned absolute positions).

Adding a family: map its `model_type` in `_FAMILIES` to the class whose module names it shares,
or write a subclass naming its blocks, embeddings, head and targets; then add a tiny random
config of it to the split-equivalence tests (tests/conftest.py BUILDERS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from hsplitlora.errors import UsageError


@dataclass(frozen=True)
class Target:
    """Where a candidate matrix lives inside one block: a module path and an optional output slice
    (q, k and v are thirds of GPT-2's fused `c_attn`)."""

    module: str
    slot: str | None = None


class Architecture:
    """Base class: subclasses name the modules; the shared code cuts and calls them."""

    def __init__(self, config: Any = None):
        self.config = config

    name: str
    blocks_path: str
    targets: dict[str, Target]
    embedding_paths: tuple[str, ...]  # modules a client part needs besides its blocks
    head_paths: tuple[str, ...]  # modules the server part needs besides its blocks
    context_paths: tuple[str, ...] = ()  # weight-free modules with buffers (rotary), needed by both

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.blocks_path)

    def num_blocks(self, model: nn.Module) -> int:
        return len(self.blocks(model))

    def embedding(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def head(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def block_context(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def slot_sizes(self, module_path: str, module: nn.Module) -> dict[str, int] | None:
        """Output sizes of the slots of a fused module (in output order), or None when the module
        is one candidate matrix."""
        return None


class _LlamaEmbedding(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)


class _NormHead(nn.Module):
    """The final norm and the LM head; Gemma caps the logits softly, cap * tanh(logits / cap)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, softcap: float | None = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(self.norm(hidden))
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class _LlamaContext(nn.Module):
    """Rotary position embeddings and the causal masks; holds no weights, only the rotary
    frequency buffer. Each block gets the mask its attention type asks for: Qwen2 names a type
    per layer (`layer_types`), Mistral slides a window on every layer when it has one."""

    def __init__(self, config: Any, rotary_emb: nn.Module):
        super().__init__()
        self.config = config
        self.rotary_emb = rotary_emb

    def attention_type(self, block: nn.Module) -> str:
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[block.self_attn.layer_idx]
        if self.config.model_type == "mistral" and getattr(self.config, "sliding_window", None):
            return "sliding_attention"
        return "full_attention"

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
        arguments = {"config": self.config, "inputs_embeds": hidden, "attention_mask": attention_mask,
                     "past_key_values": None, "position_ids": position_ids}  # fmt: skip
        layer_types = getattr(self.config, "layer_types", None) or ["full_attention"]
        if self._rotary_per_layer_type():  # Gemma 3: local and global layers rotate differently
            rotations = {kind: self.rotary_emb(hidden, position_ids, kind) for kind in sorted(set(layer_types))}
        else:
            rotations = self.rotary_emb(hidden, position_ids=position_ids)
        return {
            # Both kinds are cheap to build, and a part does not know which of its blocks need which.
            "masks": {
                "full_attention": create_causal_mask(**arguments),
                "sliding_attention": create_sliding_window_causal_mask(**arguments)
                if getattr(self.config, "sliding_window", None)
                else None,
            },
            "position_embeddings": rotations,
            "position_ids": position_ids,
            "attention_type": self.attention_type,
        }

    def _rotary_per_layer_type(self) -> bool:
        import inspect

        return "layer_type" in inspect.signature(self.rotary_emb.forward).parameters

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, context: dict) -> torch.Tensor:
        kind = context["attention_type"](block)
        rotations = context["position_embeddings"]
        out = block(
            hidden,
            attention_mask=context["masks"][kind],
            position_ids=context["position_ids"],
            position_embeddings=rotations[kind] if isinstance(rotations, dict) else rotations,
            use_cache=False,
        )
        return out[0] if isinstance(out, tuple) else out


class LlamaFamily(Architecture):
    name = "llama"
    blocks_path = "model.layers"
    embedding_paths = ("model.embed_tokens",)
    head_paths = ("model.norm", "lm_head")
    context_paths = ("model.rotary_emb",)
    targets = {
        "q": Target("self_attn.q_proj"),
        "k": Target("self_attn.k_proj"),
        "v": Target("self_attn.v_proj"),
        "o": Target("self_attn.o_proj"),
        "gate": Target("mlp.gate_proj"),
        "up": Target("mlp.up_proj"),
        "down": Target("mlp.down_proj"),
    }

    def embedding(self, model: nn.Module) -> nn.Module:
        return _LlamaEmbedding(model.model.embed_tokens)

    def head(self, model: nn.Module) -> nn.Module:
        return _NormHead(model.model.norm, model.lm_head, getattr(model.config, "final_logit_softcapping", None))

    def block_context(self, model: nn.Module) -> nn.Module:
        return _LlamaContext(model.config, model.model.rotary_emb)


class Phi3Family(LlamaFamily):
    """Phi-3: the LLaMA layout with [q | k | v] fused in `qkv_proj` and [gate | up] in
    `gate_up_proj`; each part is a slot with its own adapter."""

    name = "phi3"
    targets = {
        "q": Target("self_attn.qkv_proj", "q"),
        "k": Target("self_attn.qkv_proj", "k"),
        "v": Target("self_attn.qkv_proj", "v"),
        "o": Target("self_attn.o_proj"),
        "gate": Target("mlp.gate_up_proj", "gate"),
        "up": Target("mlp.gate_up_proj", "up"),
        "down": Target("mlp.down_proj"),
    }

    def slot_sizes(self, module_path: str, module: nn.Module) -> dict[str, int] | None:
        config = self.config
        if module_path == "self_attn.qkv_proj":
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
            kv = config.num_key_value_heads * head_dim
            return {"q": config.num_attention_heads * head_dim, "k": kv, "v": kv}
        if module_path == "mlp.gate_up_proj":
            return {"gate": config.intermediate_size, "up": config.intermediate_size}
        return None


class _GPT2Embedding(nn.Module):
    def __init__(self, wte: nn.Embedding, wpe: nn.Embedding, drop: nn.Module):
        super().__init__()
        self.wte = wte
        self.wpe = wpe
        self.drop = drop

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.wte(input_ids) + self.wpe(position_ids))


class _GPT2Context(nn.Module):
    def __init__(self, config: Any):
        super().__init__()
        self.config = config

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> dict:
        mask = create_causal_mask(
            config=self.config,
            inputs_embeds=hidden,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        return {"mask": mask, "position_ids": position_ids}

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, context: dict) -> torch.Tensor:
        out = block(hidden, None, context["mask"], use_cache=False, position_ids=context["position_ids"])
        return out[0] if isinstance(out, tuple) else out


class GPT2Family(Architecture):
    name = "gpt2"
    blocks_path = "transformer.h"
    embedding_paths = ("transformer.wte", "transformer.wpe")
    head_paths = ("transformer.ln_f", "lm_head")
    targets = {
        "q": Target("attn.c_attn", "q"),
        "k": Target("attn.c_attn", "k"),
        "v": Target("attn.c_attn", "v"),
        "o": Target("attn.c_proj"),
        "up": Target("mlp.c_fc"),
        "down": Target("mlp.c_proj"),
    }

    def embedding(self, model: nn.Module) -> nn.Module:
        return _GPT2Embedding(model.transformer.wte, model.transformer.wpe, model.transformer.drop)

    def head(self, model: nn.Module) -> nn.Module:
        return _NormHead(model.transformer.ln_f, model.lm_head)

    def block_context(self, model: nn.Module) -> nn.Module:
        return _GPT2Context(model.config)

    def slot_sizes(self, module_path: str, module: nn.Module) -> dict[str, int] | None:
        if module_path == "attn.c_attn":  # [q | k | v] side by side along the output
            width = module.nf // 3
            return {"q": width, "k": width, "v": width}
        return None


_FAMILIES: dict[str, type[Architecture]] = {
    "llama": LlamaFamily,
    "qwen2": LlamaFamily,
    "qwen3": LlamaFamily,
    "mistral": LlamaFamily,
    "olmo2": LlamaFamily,
    "gemma2": LlamaFamily,
    "gemma3_text": LlamaFamily,
    "phi3": Phi3Family,
    "gpt2": GPT2Family,
}


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def architecture_of(model: nn.Module) -> Architecture:
    """The architecture family of a transformers causal LM, from its config's model_type."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _FAMILIES:
        raise UsageError(
            f"model type {model_type!r} is not supported; supported types are {', '.join(sorted(_FAMILIES))}."
        )
    return _FAMILIES[model_type](model.config)


def hidden_size(config) -> int:
    """The width d of a model's hidden states, from its transformers config (GPT-2's n_embd)."""
    return getattr(config, "hidden_size", None) or config.n_embd
