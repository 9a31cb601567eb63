"""What a run pays before its first step and an evaluation after its last: tokenizing E2E, and
starting METEOR's JVM. Measured side by side in one process:

- E2E's devset (4.7k examples) tokenized one example at a time (`encode`, two tokenizer calls each,
  as every run did until 2026-12-08), in two batched calls (`encode_many`), and read again by a
  later run of the same process (`encoded_file`, kept per file, tokenizer and max_len);
- the five E2E metrics of 20 outputs scored with a fresh METEOR process each time (as every
  evaluation did) and with the process's one METEOR process (`meteor_scorer`).

    .venv/bin/python benchmarks/startup.py --tokenizer smollm2

Last lines: RESULT e2e_encode_seconds_ratio=<batched and kept over one at a time, for a second run>
and RESULT e2e_score_seconds_ratio=<reused METEOR over fresh>.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def seconds(action, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", choices=("smollm2", "bytes"), default="smollm2")
    parser.add_argument("--max-len", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from hsplitlora.data import e2e
    from hsplitlora.evaluation import e2e_metrics
    from hsplitlora.models.loading import byte_tokenizer

    if args.tokenizer == "smollm2":
        from transformers import AutoTokenizer

        from hsplitlora.models.loading import prepare_smollm2

        tokenizer = AutoTokenizer.from_pretrained(prepare_smollm2())
    else:
        tokenizer = byte_tokenizer()
    path = e2e.data_file(None, "train")
    examples = e2e.read_e2e(path)
    one_by_one = seconds(lambda: [e2e.encode(x, tokenizer, args.max_len) for x in examples], args.repeats)
    batched = seconds(lambda: e2e.encode_many(examples, tokenizer, args.max_len), args.repeats)
    e2e.encoded_file(path, tokenizer, args.max_len)  # the first run of the process
    kept = seconds(lambda: e2e.encoded_file(path, tokenizer, args.max_len), args.repeats)
    same = e2e.encode_many(examples, tokenizer, args.max_len) == [e2e.encode(x, tokenizer, args.max_len)
                                                                   for x in examples]  # fmt: skip
    print(f"{len(examples)} examples, {args.tokenizer} tokenizer, max_len {args.max_len} (same ids: {same})")
    print(f"  one at a time {one_by_one:.2f} s, batched {batched:.2f} s, kept for a later run {kept:.3f} s")

    test = e2e.read_e2e(e2e.data_file(None, "test"))
    references: dict[str, list[str]] = {}
    for row in test:
        references.setdefault(row.mr, []).append(row.ref)
    refs = list(references.values())[:20]
    outputs = [r[0] for r in refs]

    def fresh() -> dict:
        e2e_metrics.close_meteor()
        return e2e_metrics.score_e2e(refs, outputs)

    fresh_s = seconds(fresh, args.repeats)
    reused_s = seconds(lambda: e2e_metrics.score_e2e(refs, outputs), args.repeats)
    print(f"E2E metrics of 20 outputs: a fresh METEOR process {fresh_s:.2f} s, the process's one {reused_s:.2f} s")
    e2e_metrics.close_meteor()
    print(f"RESULT e2e_encode_seconds_ratio={kept / one_by_one:.4f}")
    print(f"RESULT e2e_score_seconds_ratio={reused_s / fresh_s:.4f}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
