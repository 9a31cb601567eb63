"""LoRA: the multi-tenant layer (arithmetic only) and the code that attaches it to a model."""

from hsplitlora.lora.attach import Candidate, attach_lora, set_active_adapter
from hsplitlora.lora.layer import MultiLoRALayer

__all__ = ["Candidate", "MultiLoRALayer", "attach_lora", "set_active_adapter"]
