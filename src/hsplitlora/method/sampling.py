"""Client sampling (method.md section 7): each round, `clients_per_round` of the K clients train
and upload; p_i is over them; the others keep their adapters and optimizer state and merge the
round's update like everyone. Flower calls the fraction form fraction-fit.

The draw is a function of (seed, round) alone, so a resumed run draws what an uninterrupted one
would without storing anything.
"""

from __future__ import annotations

import math

import numpy as np

_STREAM = 0x5A4D  # keeps the draw apart from every other generator keyed by the run's seed


def per_round(setting: int | float | None, clients: int) -> int:
    """How many clients train each round: every one (None), a count n, or a fraction f of K,
    floor(f K) and at least one (Flower's fraction-fit)."""
    if setting is None:
        return clients
    if isinstance(setting, float):
        return min(clients, max(1, math.floor(setting * clients + 1e-9)))  # 0.3 * 10 is 3, not 2.9999
    return setting


def sample_clients(seed: int, round_: int, clients: int, count: int) -> list[int]:
    """The `count` clients (sorted ids) that train in round `round_`: drawn without replacement by a
    generator keyed by (seed, round); every client when `count` covers them all."""
    if count >= clients:
        return list(range(clients))
    generator = np.random.default_rng([seed, round_, _STREAM])
    return sorted(int(cid) for cid in generator.choice(clients, size=count, replace=False))
