"""Important Weight Identification (IWI), method.md section 3.

    Theta_t(W) = | sum_j w_j dL/dw_j | / C(W, r_ref)
    I_t = gamma_t I_{t-1} + (1 - gamma_t) Theta_t,             I_0 = Theta_1
    gamma_t = min(gamma_max, 1 - exp(-(t / tau) (1 + phi_t)))
    phi_t = mean_W |Theta_t(W) - I_{t-1}(W)| / (I_{t-1}(W) + eps)

`sum_j w_j dL/dw_j` comes from the LoRA layers' unit gates (y = g W x + b, so dL/dg equals it)
without any weight gradient; each role reads the gates of the blocks it runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from hsplitlora.lora.attach import Candidate
from hsplitlora.lora.layer import MultiLoRALayer
from hsplitlora.losses import target_token_loss
from hsplitlora.method.memory import MemoryModel

R_REF = 8


def candidate_layers(part: nn.Module, candidates: Mapping[str, Candidate]) -> dict[str, MultiLoRALayer]:
    """The LoRA layer of every candidate whose block this part runs (parts list `block_indices`)."""
    position = {block: i for i, block in enumerate(part.block_indices)}
    return {
        name: part.blocks[position[c.block]].get_submodule(c.local_module)
        for name, c in candidates.items()
        if c.block in position
    }


class ImportanceProbe:
    """Accumulates sum_j w_j dL/dw_j per candidate over the batches of one role's part."""

    def __init__(self, layers: Mapping[str, MultiLoRALayer], candidates: Mapping[str, Candidate]):
        self.layers = dict(layers)
        self.slots = {name: candidates[name].slot for name in self.layers}
        self.sums: dict[str, float] = dict.fromkeys(self.layers, 0.0)
        self.batches = 0

    @classmethod
    def for_part(cls, part: nn.Module, candidates: Mapping[str, Candidate]) -> ImportanceProbe:
        return cls(candidate_layers(part, candidates), candidates)

    @classmethod
    def for_model(cls, model: nn.Module, candidates: Mapping[str, Candidate]) -> ImportanceProbe:
        return cls({name: model.get_submodule(c.module) for name, c in candidates.items()}, candidates)

    def start(self) -> None:
        """Arm the gates before a forward pass."""
        for layer in set(self.layers.values()):
            layer.track_importance(True)

    def collect(self) -> None:
        """Read the gates after a backward pass, then disarm them."""
        taken = {id(layer): layer.take_importance() for layer in set(self.layers.values())}
        for name, layer in self.layers.items():
            self.sums[name] += taken[id(layer)][self.slots[name]]
        for layer in set(self.layers.values()):
            layer.track_importance(False)
        self.batches += 1

    def report(self) -> tuple[dict[str, float], int]:
        """(per-candidate sums, batches) since the last report; resets the accumulator."""
        sums, batches = self.sums, self.batches
        self.sums, self.batches = dict.fromkeys(self.layers, 0.0), 0
        return sums, batches


def warmup_sums(
    model: nn.Module, candidates: Mapping[str, Candidate], batches: Iterable
) -> tuple[dict[str, float], int]:
    """sum_j w_j dL/dw_j per candidate over a few batches on the unsplit frozen model (the plan's
    importance before any training history; equal to what clients and server would measure)."""
    probe = ImportanceProbe.for_model(model, candidates)
    for batch in batches:
        probe.start()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = target_token_loss(logits, batch.labels)
        (total / max(count, 1)).backward()
        probe.collect()
    return probe.report()


def importance(sums: Mapping[str, float], batches: int, memory: MemoryModel, r_ref: int = R_REF) -> dict[str, float]:
    """Theta(W) = |mean over batches of sum_j w_j dL/dw_j| / C(W, r_ref)."""
    batches = max(batches, 1)
    return {name: abs(value / batches) / memory.adapter_bytes(name, r_ref) for name, value in sums.items()}


def average_importance(per_client: Iterable[Mapping[str, float]], samples: Iterable[int]) -> dict[str, float]:
    """The fed server's global Theta: the clients' values weighted by their sample counts."""
    per_client, samples = list(per_client), list(samples)
    total = sum(samples)
    names = sorted({name for theta in per_client for name in theta})
    return {
        name: sum(n * theta.get(name, 0.0) for theta, n in zip(per_client, samples, strict=True)) / total
        for name in names
    }


@dataclass
class SmoothedImportance:
    """The adaptive history: early rounds follow new evidence, later and noisier ones lean on it."""

    gamma_max: float = 0.9
    tau: float = 5.0
    eps: float = 1e-12
    round: int = 0
    value: dict[str, float] = field(default_factory=dict)
    gamma: float = 0.0

    def update(self, theta: Mapping[str, float]) -> dict[str, float]:
        self.round += 1
        previous = self.value or dict(theta)  # I_0 = Theta_1
        fluctuation = float(np.mean([abs(theta[n] - previous[n]) / (previous[n] + self.eps) for n in theta]))
        self.gamma = min(self.gamma_max, 1.0 - math.exp(-(self.round / self.tau) * (1.0 + fluctuation)))
        self.value = {n: self.gamma * previous[n] + (1.0 - self.gamma) * theta[n] for n in theta}
        return dict(self.value)


def kendall_tau_distance(a: Mapping[str, float], b: Mapping[str, float]) -> float:
    """Share of candidate pairs ranked in opposite orders by a and b (0: same ranking, 1: reversed)."""
    names = sorted(set(a) & set(b))
    if len(names) < 2:
        return 0.0
    x = np.array([a[n] for n in names])
    y = np.array([b[n] for n in names])
    upper = np.triu_indices(len(names), k=1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    return float(np.mean(dx * dy < 0))


def should_replan(current: Mapping[str, float], at_last_plan: Mapping[str, float], delta: float = 0.1) -> bool:
    """Re-plan when the importance ranking moved by more than delta (Kendall-tau distance)."""
    return kendall_tau_distance(current, at_last_plan) > delta
