"""Memory model accuracy: measured peak memory of fine-tuning a SmolLM2-135M client part against
the memory model's prediction, for split points {2, 8, 16, 24} and ranks {2, 8, 16}.

How memory is measured: each configuration runs in a fresh subprocess (glibc told to serve every
allocation above 64 KiB with mmap, so freed tensors leave the resident set at once). The worker
imports everything, warms the kernels up on a throw-away layer, loads the tokenizer and the model
code (no weights), and reads its resident set size (VmRSS) as the baseline. It then loads only
the client part's weights (embeddings and blocks [0, s), straight from the safetensors cache),
attaches rank-r adapters to q, k, v, o of those blocks, resets the kernel's peak counter
(/proc/self/clear_refs) so that the transient of reading the file does not count, and runs 3
client training steps at batch 8 x 80 tokens (forward, backward of a gradient of the cut's shape
as the main server would send, AdamW step). Measured = peak resident set (VmHWM) - baseline.
Predicted = MemoryModel.client_bytes(s, ranks), with A_block measured once.

`--tail T` measures U-shaped clients instead (split points {2, 8, 16}, ranks {2, 16}): the client
also loads the last T blocks, the final norm and the head, and each step runs the front, then the
tail on activations of the middle's shape, the loss on random labels, the tail's backward and the
front's backward. Predicted = the same memory model with `with_tail(T)`.

`--dtype bfloat16` (or float16) loads the frozen weights in that dtype (adapters stay float32);
`--anchored` gives every adapter an anchor (B0, A0), as persistent adapters keep across rounds.
`--quant int8` (or nf4) holds every linear weight of the client's blocks only quantized (the float
weights freed after quantizing, before the peak is reset; bitsandbytes is imported and warmed up
before the baseline); predicted = the memory model `with_quant`.
`--recompute` has the client's front blocks recompute their activations in backward (activation
checkpointing, keeping each block's input); predicted = `with_recompute("on")`.
`--dp-sgd` trains with DP-SGD (each LoRA layer keeps what per-example gradients need; each step's
gradients are clipped per example and noised, privacy/dp.py); predicted = `with_per_example`.

    .venv/bin/python benchmarks/memory_model.py
    .venv/bin/python benchmarks/memory_model.py --tail 1
    .venv/bin/python benchmarks/memory_model.py --dtype bfloat16
    .venv/bin/python benchmarks/memory_model.py --anchored
    .venv/bin/python benchmarks/memory_model.py --quant nf4
    .venv/bin/python benchmarks/memory_model.py --dp-sgd
    .venv/bin/python benchmarks/memory_model.py --recompute --anchored

Last line: RESULT memory_model_max_rel_error=<max |pred - meas| / meas> (target <= 0.15), or
RESULT memory_model_u_max_rel_error=... with --tail (_bfloat16, _anchored, _int8, _nf4, _dpsgd,
_recompute in the name with those).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

SPLITS = (2, 8, 16, 24)
RANKS = (2, 8, 16)
BATCH, SEQ = 8, 80
MODEL = "smollm2-135m"


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def worker(split_point: int, rank: int, tail: int, dtype: str, anchored: bool, quant: str = "none",
           dp_sgd: bool = False, recompute: bool = False) -> None:  # fmt: skip
    """One client's training steps in this fresh process; `tail` < 0: the standard split."""
    import torch

    from hsplitlora.lora.attach import attach_lora, lora_layers, set_active_adapter, wrap_frozen_linears
    from hsplitlora.lora.quant import quantize
    from hsplitlora.losses import target_token_loss
    from hsplitlora.models.architectures import architecture_of
    from hsplitlora.models.loading import load_part
    from hsplitlora.models.split import ClientPart, UClientPart

    torch.manual_seed(0)
    warm = torch.nn.Linear(64, 64)  # load kernels and allocator code before the baseline
    warm(torch.randn(4, 64, requires_grad=True)).sum().backward()
    del warm
    if quant != "none":  # the quantization library's code and first kernels, before the baseline too
        quantize(torch.randn(64, 64), quant).dequantize()
    # The runtime a device needs whatever it trains (tokenizer, model code) is loaded before the
    # baseline too: what remains is the memory of fine-tuning.
    runtime = load_part(MODEL, range(0), embedding=False, head=False, dtype=dtype)
    baseline = rss_kib("VmRSS")
    num_blocks = runtime.model.config.num_hidden_layers
    blocks = [*range(split_point), *(range(num_blocks - tail, num_blocks) if tail >= 0 else [])]
    loaded = load_part(MODEL, blocks, embedding=True, head=tail >= 0, with_tokenizer=False, dtype=dtype)
    model = loaded.model
    arch = architecture_of(model)
    candidates = attach_lora(model, ["q", "k", "v", "o"])
    client_side = {n: c for n, c in candidates.items() if c.block in blocks}
    if quant != "none":
        wrap_frozen_linears(model)
        for index in blocks:
            for layer in lora_layers(arch.blocks(model)[index]):
                layer.hold_quantized(quant)
    generator = torch.Generator().manual_seed(0)
    for candidate in client_side.values():
        layer = model.get_submodule(candidate.module)
        layer.set_adapter("c", candidate.slot, rank, 16.0, generator)
        if anchored:
            layer.set_anchor("c", candidate.slot)
    part = ClientPart(arch, model, split_point) if tail < 0 else UClientPart(arch, model, split_point, tail)
    part.quant = quant
    (part.front if tail >= 0 else part).recompute = recompute
    set_active_adapter(part, "c")
    params = [p for n, p in part.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    dpsgd = None
    if dp_sgd:
        from hsplitlora.privacy.dp import DPSGD, keep_per_example

        keep_per_example([part], True)
        dpsgd = DPSGD(1.0, 1.0, torch.Generator().manual_seed(0))
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    mask = torch.ones(BATCH, SEQ, dtype=torch.long)
    # Loading streams each tensor through a mapped file page by page: that transient is not
    # fine-tuning memory, so the peak is reset once the weights sit in memory.
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    labels = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    for _ in range(3):
        if tail < 0:
            hidden = part(ids, mask)
            hidden.backward(torch.randn_like(hidden))
        else:  # (the gradient the main server sends has the activations' dtype)
            hidden = part.front(ids, mask)
            middle = torch.randn_like(hidden).requires_grad_(True)  # what the main server sends back
            total, count = target_token_loss(part.tail(middle, mask), labels)
            (total / count).backward()
            hidden.backward(torch.randn_like(hidden))
        if dpsgd is not None:
            dpsgd.privatize([part], "c", BATCH)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    peak = rss_kib("VmHWM")
    del runtime
    print(json.dumps({"measured_bytes": (peak - baseline) * 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, type=int, metavar=("SPLIT", "RANK", "TAIL"), help=argparse.SUPPRESS)
    parser.add_argument("--tail", type=int, help="measure U-shaped clients keeping the last TAIL blocks")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="the frozen weights' dtype (float32)")  # fmt: skip
    parser.add_argument("--anchored", action="store_true", help="adapters keep an anchor (persistent adapters)")
    parser.add_argument("--quant", default="none", choices=("none", "int8", "nf4"),
                        help="hold the client's block weights quantized (none)")  # fmt: skip
    parser.add_argument("--dp-sgd", action="store_true", help="train with DP-SGD's per-example gradients")
    parser.add_argument("--recompute", action="store_true", help="the client's blocks recompute their activations")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker, args.dtype, args.anchored, args.quant, args.dp_sgd, args.recompute)
        return

    from hsplitlora.lora.attach import attach_lora
    from hsplitlora.method.memory import measure_memory_model
    from hsplitlora.models.loading import load_model

    model = load_model(MODEL, dtype=args.dtype).model
    candidates = attach_lora(model, ["q", "k", "v", "o"])
    memory = measure_memory_model(model, candidates, BATCH, SEQ).with_tail(args.tail).with_anchors(args.anchored)
    memory = memory.with_quant(args.quant, "none").with_per_example(args.dp_sgd)
    memory = memory.with_recompute("on" if args.recompute else "off")
    del model
    tail = -1 if args.tail is None else args.tail
    splits, ranks_tried = (SPLITS, RANKS) if args.tail is None else ((2, 8, 16), (2, 16))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_ARENA_MAX="2")
    shape = "" if args.tail is None else f", U-shaped: the client also runs the last {args.tail} block(s) and the head"
    anchors = " with anchors" if args.anchored else ""
    anchors += "" if args.quant == "none" else f", blocks held as {args.quant}"
    anchors += ", DP-SGD" if args.dp_sgd else ""
    anchors += ", blocks recomputed in backward" if args.recompute else ""
    print(f"{MODEL}, batch {BATCH} x {SEQ} tokens, {args.dtype} weights, float32 adapters{anchors} on q,k,v,o of the "
          f"client's blocks{shape}")  # fmt: skip
    print(f"A_block = {memory.block_activation_bytes / 2**20:.2f} MiB, "
          f"P_block = {memory.block_bytes_as(args.quant) / 2**20:.2f} MiB, "
          f"P_emb = {memory.embedding_bytes / 2**20:.2f} MiB")  # fmt: skip
    print(f"{'split':>5} {'rank':>4} {'measured MiB':>13} {'predicted MiB':>14} {'rel. error':>10}")
    worst = 0.0
    for split_point in splits:
        for rank in ranks_tried:
            command = [sys.executable, __file__, "--worker", str(split_point), str(rank), str(tail),
                       "--dtype", args.dtype, "--quant", args.quant,
                       *(["--anchored"] if args.anchored else []), *(["--dp-sgd"] if args.dp_sgd else []),
                       *(["--recompute"] if args.recompute else [])]  # fmt: skip
            out = subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout
            measured = json.loads(out.strip().splitlines()[-1])["measured_bytes"]
            ranks = {n: rank for n in memory.client_side(split_point)}
            predicted = memory.client_bytes(split_point, ranks)
            error = (predicted - measured) / measured
            worst = max(worst, abs(error))
            print(f"{split_point:>5} {rank:>4} {measured / 2**20:>13.1f} {predicted / 2**20:>14.1f} {error:>+10.3f}",
                  flush=True)  # fmt: skip
    name = "memory_model" + ("" if args.tail is None else "_u") + ("" if args.dtype == "float32" else f"_{args.dtype}")
    name += "" if args.quant == "none" else f"_{args.quant}"
    name += "_dpsgd" if args.dp_sgd else ""
    name += "_recompute" if args.recompute else ""
    name += "_anchored_max_rel_error" if args.anchored else "_max_rel_error"
    print(f"RESULT {name}={worst:.3f}")


if __name__ == "__main__":
    main()
