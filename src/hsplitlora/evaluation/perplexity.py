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
        logits = forward(batch)
        loss_sum, n = target_token_loss(logits, batch.labels.to(logits.device))
        total += float(loss_sum)
        count += n
    return (total / count if count else float("nan")), count


def perplexity(mean_loss: float) -> float:
    if not math.isfinite(mean_loss):
        return float("nan")
    return math.exp(mean_loss) if mean_loss < 700 else float("inf")


def model_forward(model: torch.nn.Module) -> Callable[[Batch], torch.Tensor]:
    """The merged (unsplit) model's logits, computed where the model is."""
    device = next(model.parameters()).device

    def forward(batch: Batch) -> torch.Tensor:
        batch = batch.to(device)
        return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits

    return forward
