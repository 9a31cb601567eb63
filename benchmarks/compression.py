"""Compressed activations and gradients across the cut on SmolLM2-135M: bytes per step and the
change in validation perplexity after a fixed number of rounds, for fp32, fp16, bf16 and int8.

Every mode runs the same hsplitlora federation (same seed, data, cuts and ranks): 2 clients cut
after blocks 4 and 8, rank 8 on q, k, v, o, 2 rounds x 3 local steps at batch 4, validation on
the first 32 rows of testset_w_refs.csv.

    .venv/bin/python benchmarks/compression.py

Last line: RESULT fp16_ppl_rel_change=<(ppl_fp16 - ppl_fp32) / ppl_fp32> (target: |change| <= 0.01
with half the bytes of fp32).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hsplitlora.compression import MODES
from hsplitlora.config import RunConfig
from hsplitlora.rounds import run


def main() -> None:
    results = {}
    print("mode   cut bytes per step   vs fp32   final val ppl   change vs fp32")
    with tempfile.TemporaryDirectory() as folder:
        for mode in MODES:
            config = RunConfig(
                model="smollm2-135m", clients=2, split_point=[4, 8], rank=8, rounds=2, local_steps=3, batch_size=4,
                max_seq_len=96, val_size=32, compression=mode, seed=0, output_dir=str(Path(folder) / mode),
            )  # fmt: skip
            result = run(config)
            steps = config.rounds * config.local_steps * config.clients
            cut = sum(
                entry["bytes_activations"] + entry["bytes_gradients"] for line in result.metrics
                for entry in line["clients"]
            )  # fmt: skip
            results[mode] = {"bytes_per_step": cut / steps, "ppl": result.summary["final_val_ppl"]}
            base = results["fp32"]
            print(f"{mode:<6} {cut / steps:>19,.0f} {cut / steps / base['bytes_per_step']:>9.3f} "
                  f"{results[mode]['ppl']:>15.4f} {(results[mode]['ppl'] - base['ppl']) / base['ppl']:>+16.5f}",
                  flush=True)  # fmt: skip
    print(json.dumps(results))
    change = (results["fp16"]["ppl"] - results["fp32"]["ppl"]) / results["fp32"]["ppl"]
    print(f"RESULT fp16_ppl_rel_change={change:.5f}")


if __name__ == "__main__":
    main()
