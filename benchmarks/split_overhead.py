"""Split-training overhead: tokens/s of hsplitlora's in-process split step (one client) against a
plain unsplit LoRA loop built with peft, on the same model, targets, rank, batches and optimizer,
measured side by side in one process (alternating A, B, A, B, ... to cancel drift).

    .venv/bin/python benchmarks/split_overhead.py [--model smollm2-135m] [--steps 8] [--repeats 2]

Last line: RESULT split_overhead_ratio=<split tokens/s divided by peft tokens/s> (target >= 0.90).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch
from peft import LoraConfig, get_peft_model

from hsplitlora.config import RunConfig
from hsplitlora.data.e2e import Batcher, data_file, encode, read_e2e
from hsplitlora.losses import target_token_loss
from hsplitlora.models.loading import load_model
from hsplitlora.setup import fixed_federation

PEFT_TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per repeat and loop")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--split-point", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)

    ours = load_model(args.model)
    theirs = load_model(args.model)
    examples = read_e2e(data_file(None, "train"))[:2000]
    items = [encode(e, ours.tokenizer, 128) for e in examples]
    batcher = Batcher(items, args.batch_size, ours.tokenizer.pad_token_id, seed=0)
    total_steps = (args.warmup + args.steps) * args.repeats
    batches = [next(batcher) for _ in range(total_steps)]

    config = RunConfig(model=args.model, clients=1, split_point=args.split_point, rank=args.rank,
                       batch_size=args.batch_size, lr=5e-4)  # fmt: skip
    federation = fixed_federation(config, loaded=ours)
    client = federation.clients[0]

    peft_model = get_peft_model(
        theirs.model,
        LoraConfig(r=args.rank, lora_alpha=16, lora_dropout=0.0, target_modules=PEFT_TARGETS["llama"]),
    )
    peft_model.eval()  # the same no-dropout setting hsplitlora uses for the frozen base
    peft_optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-4)
    ours_params = sum(p.numel() for p in client.parameters()) + sum(p.numel() for p in federation.server.parameters(0))
    theirs_params = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert ours_params == theirs_params, (ours_params, theirs_params)

    def split_step(batch) -> None:
        client.batches = iter([batch])
        federation.engine.split_step(client.client_id)

    def peft_step(batch) -> None:
        logits = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = target_token_loss(logits, batch.labels)
        (total / count).backward()
        peft_optimizer.step()
        peft_optimizer.zero_grad(set_to_none=True)

    seconds = {"split": 0.0, "peft": 0.0}
    tokens = {"split": 0, "peft": 0}
    feed = iter(batches)
    for _ in range(args.repeats):
        chunk = list(itertools.islice(feed, args.warmup + args.steps))
        for name, step in (("split", split_step), ("peft", peft_step)):
            for batch in chunk[: args.warmup]:
                step(batch)
            started = time.perf_counter()
            for batch in chunk[args.warmup :]:
                step(batch)
            seconds[name] += time.perf_counter() - started
            tokens[name] += sum(int(b.attention_mask.sum()) for b in chunk[args.warmup :])

    rates = {name: tokens[name] / seconds[name] for name in seconds}
    print(f"model {args.model}, rank {args.rank} on q,k,v,o, batch {args.batch_size}, "
          f"{args.steps} timed steps x {args.repeats} repeats, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"trainable parameters: {ours_params} (both)")
    for name in ("split", "peft"):
        print(f"{name:>5}: {rates[name]:8.1f} tokens/s ({seconds[name] / (args.steps * args.repeats):.3f} s/step)")
    print(f"RESULT split_overhead_ratio={rates['split'] / rates['peft']:.3f}")


if __name__ == "__main__":
    main()
