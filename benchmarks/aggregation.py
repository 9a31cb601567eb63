"""Cost of aggregation at the fed server as the number of clients K and the ranks grow.

Every candidate of SmolLM2-135M (30 blocks; q, k, v, o, gate, up, down: 210 matrices, shapes from
the model's config) gets one adapter per client with ranks drawn from the levels up to r_max (a
heterogeneous federation). The benchmark times, per round and for all 210 matrices:

- NAA: stacking [p_i s_i B_i] and [A_i] (what the fed server does), and the dense merge B @ A
  that every holder of the matrix then performs;
- the dense reference sum_i p_i s_i B_i A_i (what NAA equals, computed matrix by matrix; K <= 10);
- HetLoRA's zero-padded average.

It also prints the bytes NAA sends back per matrix set (stacked factors, or the dense update when
that is smaller). Each time is the median of 3 repetitions.

    .venv/bin/python benchmarks/aggregation.py

Last line: RESULT naa_seconds_k50_r32=<s> (stack + merge of all 210 matrices at K = 50, r_max = 32).
"""

from __future__ import annotations

import statistics
import time

import torch

from hsplitlora.method.aggregation import AdapterFactors, aggregate, dense_average, zero_padded_average

HIDDEN, KV, INTER, BLOCKS = 576, 192, 1536, 30
SHAPES = {"q": (HIDDEN, HIDDEN), "k": (KV, HIDDEN), "v": (KV, HIDDEN), "o": (HIDDEN, HIDDEN),
          "gate": (INTER, HIDDEN), "up": (INTER, HIDDEN), "down": (HIDDEN, INTER)}  # fmt: skip
KS = (5, 10, 50)
R_MAX = (8, 32)


def federation(clients: int, r_max: int, generator: torch.Generator) -> list[list[AdapterFactors]]:
    levels = [r for r in (2, 4, 8, 16, 32) if r <= r_max]
    matrices = []
    for _ in range(BLOCKS):
        for d_out, d_in in SHAPES.values():
            factors = []
            for cid in range(clients):
                rank = levels[int(torch.randint(len(levels), (1,), generator=generator))]
                a = torch.randn(rank, d_in, generator=generator)
                b = torch.randn(d_out, rank, generator=generator) * 0.01
                factors.append(AdapterFactors(cid, 100 + cid, a, b, 16.0 / rank))
            matrices.append(factors)
    return matrices


def timed(function, matrices) -> float:
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for factors in matrices:
            function(factors)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def naa_and_merge(factors):
    return aggregate(factors).dense()


def main() -> None:
    torch.set_num_threads(2)
    generator = torch.Generator().manual_seed(0)
    print(f"SmolLM2-135M shapes, {BLOCKS * len(SHAPES)} matrices; seconds per aggregation round (median of 3)")
    print(f"{'K':>3} {'r_max':>5} {'NAA stack':>10} {'NAA + merge':>12} {'dense ref':>10} {'zero-pad':>9} "
          f"{'NAA MB sent':>12} {'dense MB':>9}")  # fmt: skip
    result = None
    for clients in KS:
        for r_max in R_MAX:
            matrices = federation(clients, r_max, generator)
            stack = timed(aggregate, matrices)
            merge = timed(naa_and_merge, matrices)
            dense = timed(dense_average, matrices) if clients <= 10 else float("nan")  # K products per matrix
            padded = timed(zero_padded_average, matrices)
            sent = dense_bytes = 0
            for factors in matrices:
                stacked = aggregate(factors)
                full = stacked.b.shape[0] * stacked.a.shape[1]
                sent += 4 * min(stacked.numel(), full)
                dense_bytes += 4 * full
            print(f"{clients:>3} {r_max:>5} {stack:>10.3f} {merge:>12.3f} {dense:>10.3f} {padded:>9.3f} "
                  f"{sent / 1e6:>12.1f} {dense_bytes / 1e6:>9.1f}", flush=True)  # fmt: skip
            if clients == 50 and r_max == 32:
                result = merge
    print(f"RESULT naa_seconds_k50_r32={result:.3f}")


if __name__ == "__main__":
    main()
