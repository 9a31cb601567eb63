"""What NAA's update costs on the clients' down-links, form by form, in a real run of the study's
regime ii (SmolLM2-135M, five devices; method.md section 6, down-link forms).

It runs hsplitlora with the study's settings for regime ii (fewer rounds and local steps) and, at
every aggregation, counts for every client the bytes of the update of the candidates it holds:

    exact      the whole stacked change (or the dense matrix, whichever is smaller), as before
    own-free   the same without the client's own term, which it rebuilds (what a run sends now)
    svd-ef     the best rank-k approximation of (dW + R) with error feedback (`update_form: svd-ef`),
               from a second fed server fed the same uploads
    fedavg     averaged factors at the largest rank trained (SplitLoRA's FedAvg)

and the SVD-EF error: |U - dW|_F / |dW|_F over all candidates (this round's update against what was
sent) and |R|_F / |sum of dW|_F (what is delayed to later rounds).

    .venv/bin/python benchmarks/update_bytes.py                 # 2 rounds, 2 local steps, k = 32
    .venv/bin/python benchmarks/update_bytes.py --rank 48 --rounds 3

Last line: RESULT naa_down_bytes_ratio=<the exact family's smallest total down bytes over FedAvg's>.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
from study import FULL, QUICK, regime_of, run_config  # benchmarks/study.py, beside this script

FORMS = ("exact", "own-free", "svd-ef", "fedavg")


def dense(delta) -> torch.Tensor:
    return delta if isinstance(delta, torch.Tensor) else delta.dense()


def shape(delta) -> tuple[int, int]:
    """(d_out, d_in) of a change sent dense or stacked."""
    return tuple(delta.shape) if isinstance(delta, torch.Tensor) else (delta.b.shape[0], delta.a.shape[1])


def measure(
    seed: int, rounds: int, local_steps: int, rank: int, threads: int | None, quick: bool = False
) -> list[dict]:
    """Per round: total down bytes over the clients per form, the weakest client's, and the errors."""
    from hsplitlora.compression import VALUE_BYTES
    from hsplitlora.engines.protocol import Engine
    from hsplitlora.method.aggregation import FEDAVG, TruncatedChange
    from hsplitlora.roles.fed_server import FedServer
    from hsplitlora.rounds import run

    spec = QUICK if quick else FULL
    config = run_config(spec, regime_of(spec, "ii"), "hsplitlora", seed, Path(tempfile.mkdtemp(prefix="bytes-")))
    config.rounds, config.local_steps, config.threads = rounds, local_steps, threads
    truncating = FedServer(TruncatedChange(rank), config.compression)
    rows: list[dict] = []
    exact_total: dict[str, torch.Tensor] = {}
    original = Engine.aggregate

    def observed(self: Engine, round_: int):
        seen = {}
        aggregate = self.fed_server.aggregate

        def keep(round_, uploads):
            seen["uploads"], seen["result"] = uploads, aggregate(round_, uploads)
            return seen["result"]

        self.fed_server.aggregate = keep
        try:
            result = original(self, round_)
        finally:
            del self.fed_server.aggregate
        uploads, truncated = seen["uploads"], truncating.aggregate(round_, seen["uploads"])
        trained = {name: [f.rank for f in factors] for name, factors in FedServer.by_candidate(uploads).items()}
        per_client = {form: [] for form in FORMS}
        for cid in self.live:
            names = self.client_names(cid)
            per_client["exact"].append(result.nbytes(names))
            per_client["own-free"].append(self._update_for(result, [cid]).nbytes(names))
            per_client["svd-ef"].append(truncated.nbytes(names))
            fedavg = 0
            for name in names & set(trained):
                d_out, d_in = shape(result.deltas[name])
                fedavg += FEDAVG.values_down(d_in, d_out, trained[name], False) * VALUE_BYTES["fp32"]
            per_client["fedavg"].append(fedavg)
        error, size = 0.0, 0.0
        for name, delta in result.deltas.items():
            exact = dense(delta)
            exact_total[name] = exact_total.get(name, 0) + exact
            error += float(torch.linalg.norm(dense(truncated.deltas[name]) - exact)) ** 2
            size += float(torch.linalg.norm(exact)) ** 2
        residual = sum(float(torch.linalg.norm(r)) ** 2 for r in truncating.residual.values())
        total = sum(float(torch.linalg.norm(t)) ** 2 for t in exact_total.values())
        rows.append({"round": round_, "bytes": {f: sum(v) for f, v in per_client.items()},
                     "weakest": {f: v[0] for f, v in per_client.items()},
                     "error": (error / size) ** 0.5, "delayed": (residual / total) ** 0.5})  # fmt: skip
        return result

    Engine.aggregate = observed
    try:
        run(config, log=lambda message: None, overwrite=True)
    finally:
        Engine.aggregate = original
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32, help="k of svd-ef (update_rank)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true", help="the study's tiny model (a smoke test of this script)")
    args = parser.parse_args()
    rows = measure(args.seed, args.rounds, args.local_steps, args.rank, args.threads, args.quick)
    print(f"hsplitlora, regime ii, seed {args.seed}: down bytes to the clients per round (all clients; "
          f"weakest client), svd-ef at k = {args.rank}")  # fmt: skip
    for row in rows:
        forms = ", ".join(f"{f} {row['bytes'][f] / 1e6:.2f} MB ({row['weakest'][f] / 1e6:.2f})" for f in FORMS)
        print(f"  round {row['round']}: {forms}; svd-ef |U - dW|/|dW| {row['error']:.4f}, "
              f"|R|/|sum dW| {row['delayed']:.4f}")  # fmt: skip
    totals = {f: sum(row["bytes"][f] for row in rows) for f in FORMS}
    print("  totals: " + ", ".join(f"{f} {totals[f] / 1e6:.2f} MB" for f in FORMS))
    best = min(totals[f] for f in ("exact", "own-free", "svd-ef"))
    print(f"RESULT naa_down_bytes_ratio={best / totals['fedavg']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
