"""Perplexity on held-out references, token-weighted over target tokens:
ppl = exp( sum of target-token losses / number of target tokens )."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from hsplitlora.data.e2e import Batch
from hsplitlora.losses import target_token_loss


@torch.no_grad()
def evaluate_loss(forward: Callable[[Batch], torch.Tensor], batches: Iterable[Batch]) -> tuple[float, int]:
    """(mean target-token loss, number of target tokens) of `forward(batch) -> logits`."""
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = target_token_loss(forward(batch), batch.labels)
        total += float(loss_sum)
        count += n
    return (total / count if count else float("nan")), count


def perplexity(mean_loss: float) -> float:
    return math.exp(mean_loss) if math.isfinite(mean_loss) else float("nan")


def model_forward(model: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """The merged (unsplit) model's logits."""
    return lambda batch: model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
