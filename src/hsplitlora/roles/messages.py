"""Messages between roles: plain dataclasses of tensors and numbers that could cross a network."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Activations:
    """Client -> main server, once per step: the activations at the cut. Raw tokens stay on the
    client; the attention mask and the labels travel with the activations."""

    client_id: int
    step: int
    hidden: torch.Tensor  # (B, T, d), detached
    attention_mask: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T), -100 where no loss

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.hidden, self.attention_mask, self.labels))


@dataclass
class ActivationGradient:
    """Main server -> client, once per step: dL/dh at the cut, and the step's loss for reporting."""

    client_id: int
    step: int
    grad: torch.Tensor  # (B, T, d)
    loss: float  # mean over the batch's target tokens
    num_tokens: int

    def nbytes(self) -> int:
        return self.grad.numel() * self.grad.element_size()
