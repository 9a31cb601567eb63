"""The causal LM loss over target tokens only."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hsplitlora.data.e2e import IGNORE_INDEX


def target_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropy over target tokens, number of target tokens).
    Position t predicts token t+1, so logits drop the last position and labels the first."""
    shifted_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
    shifted_labels = labels[:, 1:].reshape(-1)
    total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return total, int((shifted_labels != IGNORE_INDEX).sum())
