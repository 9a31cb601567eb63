"""Speed and memory at real sizes on one GPU, with random weights (their values change neither
speed nor memory, so nothing is downloaded): models built from the public configurations of
LLaMA-3.2-1B, Qwen2.5-1.5B and LLaMA-2-7B in bfloat16.

For each model, side by side in one process on the same weights, batches and optimizer:
  (a) a plain peft LoRA loop on the whole model (rank 8 on q, k, v, o; AdamW),
  (b) the project's split step for one client (cut 4, the main server on the same GPU),
  (c) a 5-client in-process round: 5 clients at cut 4 interleaved on the main server, sharing the
      frozen weights;
tokens/s of each after warm-up steps (synchronised), and the model FLOP utilisation of (b):

    FLOPs/token = 4 P_frozen + 6 P_adapters + 6 L T d      (frozen matrices forward and backward to
                  their input; trained adapters also their weight gradient; causal attention, half
                  of the T x T products, forward and both backward products)

against the GPU's peak dense bf16 rate (H100/H200 SXM: 989 TFLOP/s; else --peak-tflops). Then the
memory model's prediction (MemoryModel.client_bytes, measured from the whole model as a run
measures it) against torch.cuda.max_memory_allocated for 4 client configurations: the client part
alone (embeddings and blocks [0, s)) on the GPU, rank-r adapters, 3 steps of forward, backward of a
gradient of the cut's shape, AdamW.

    python benchmarks/gpu_scale.py                       # on a GPU: 1B, 1.5B, 7B (under 8 minutes on an H200)
    python benchmarks/gpu_scale.py --models llama-3.2-1b --steps 3
    python benchmarks/gpu_scale.py --tiny                # the same code path on a tiny config (CPU or GPU)

Last lines: RESULT gpu_split_vs_peft_ratio=<min over models of (b)/(a)> (goal >= 0.95),
RESULT gpu_mfu=<(b)'s MFU on the largest model> (goal >= 0.35 on the 7B at batch 8 x 512),
RESULT gpu_memory_model_max_rel_error=<max |pred - meas| / meas> (goal <= 0.15).
Where torch sees no GPU it says so, runs the tiny config on the CPU (no memory part: that needs
CUDA's allocator statistics) and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass

import torch

# Public configurations (config.json of each model), written out so that nothing is downloaded.
CONFIGS: dict[str, dict] = {
    "llama-3.2-1b": dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0, max_position_embeddings=131072,
                         rms_norm_eps=1e-5),
    "qwen2.5-1.5b": dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                         tie_word_embeddings=True, rope_theta=1000000.0, max_position_embeddings=32768,
                         rms_norm_eps=1e-6),
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                       tie_word_embeddings=False, rope_theta=10000.0, max_position_embeddings=4096,
                       rms_norm_eps=1e-5),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=257, tie_word_embeddings=True,
                 max_position_embeddings=512, rms_norm_eps=1e-5),
}  # fmt: skip
PEFT_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
TARGETS = ["q", "k", "v", "o"]
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
# (model, split point, rank) of the memory comparison
MEMORY_CASES = [("llama-3.2-1b", 4, 8), ("llama-3.2-1b", 8, 16), ("qwen2.5-1.5b", 4, 8), ("llama-2-7b", 4, 8)]
SPLIT_POINT, CLIENTS, RANK, ALPHA, LR = 4, 5, 8, 16.0, 1e-4


@dataclass
class Speeds:
    peft: float  # tokens/s
    split: float  # anchored adapters (hsplitlora)
    plain: float  # plain adapters (splitlora)
    round: float
    mfu: float


def build(name: str, device: torch.device, dtype: torch.dtype, num_blocks: int | None = None) -> torch.nn.Module:
    """A causal LM of this configuration with random weights, made on `device` (no CPU copy)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(CONFIGS[name])
    if num_blocks is not None:
        spec["num_hidden_layers"] = num_blocks
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    from hsplitlora.models.loading import freeze

    return freeze(model)


def batches(count: int, batch: int, seq: int, vocab: int, seed: int) -> list:
    """Full-length batches of random token ids (every position a target: the busiest case)."""
    from hsplitlora.data.e2e import Batch

    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (batch, seq), generator=generator)
        out.append(Batch(ids, torch.ones_like(ids), ids.clone()))
    return out


def timed(step, feed: list, warmup: int, device: torch.device) -> float:
    """Seconds of the steps after `warmup`, the device synchronised at both ends."""
    for batch in feed[:warmup]:
        step(batch)
    synchronize(device)
    started = time.perf_counter()
    for batch in feed[warmup:]:
        step(batch)
    synchronize(device)
    return time.perf_counter() - started


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def flops_per_token(model: torch.nn.Module, seq: int, adapter_params: int) -> float:
    """4 P_frozen + 6 P_adapters + 6 L T d (see the module's docstring); P_frozen counts every
    matrix the tokens pass through (blocks and the head), not the embedding lookup."""
    config = model.config
    embedding = model.get_input_embeddings().weight.numel()
    blocks = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and p.dim() == 2) - embedding
    head = config.vocab_size * config.hidden_size
    if not getattr(config, "tie_word_embeddings", False):
        blocks -= head  # an untied head is a matrix of its own, counted below
    return 4 * (blocks + head) + 6 * adapter_params + 6 * config.num_hidden_layers * seq * config.hidden_size


def peft_speed(model, feed, warmup: int, device: torch.device) -> tuple[float, torch.nn.Module]:
    """(a) tokens/s of a plain peft LoRA loop on the whole model; returns the model unwrapped."""
    from peft import LoraConfig, get_peft_model

    from hsplitlora.losses import target_token_loss

    wrapped = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                               target_modules=PEFT_TARGETS))  # fmt: skip
    wrapped.eval()  # no dropout, as hsplitlora's frozen base
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step(batch) -> None:
        batch = batch.to(device)
        logits = wrapped(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        total, count = target_token_loss(logits, batch.labels)
        (total / count).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        float(total.detach())  # read the loss each step, as the split step does

    seconds = timed(step, feed, warmup, device)
    tokens = sum(b.input_ids.numel() for b in feed[warmup:])
    model = wrapped.unload()  # the same base weights, peft's layers taken out again
    return tokens / seconds, model


def split_speeds(model, feed, warmup: int, device: torch.device) -> tuple[float, float, float, int]:
    """(b) one client's split steps, with anchored adapters (hsplitlora's default life cycle: each
    adapter also runs its anchor, y = Wx + s(BA - B0A0)x) and with plain ones (SplitLoRA's), and
    (c) 5 anchored clients interleaved, on the project's roles and engine; tokens/s of each and
    the adapter parameters of one client (both sides)."""
    from hsplitlora.engines.inprocess import InProcessEngine
    from hsplitlora.lora.attach import attach_lora
    from hsplitlora.models.architectures import architecture_of
    from hsplitlora.roles.client import Client
    from hsplitlora.roles.main_server import MainServer
    from hsplitlora.roles.messages import RoundPlan

    arch = architecture_of(model)
    candidates = attach_lora(model, TARGETS)
    # Each step hands a client its batch (the same batches as the peft loop), so no data is read.
    tokens = sum(b.input_ids.numel() for b in feed[warmup:])
    split = {}
    for lifecycle in ("overwrite", "anchor"):  # plain first: anchors, once set, stay on the layers
        clients = [Client(cid, iter(()), candidates, LR, ALPHA, 0, "fp32", device) for cid in range(CLIENTS)]
        server = MainServer(candidates, LR, ALPHA, 0, "fp32", device)
        engine = InProcessEngine(model, arch, candidates, clients, server, cuts=[SPLIT_POINT] * CLIENTS)
        engine.configure([RoundPlan(cid, 1, SPLIT_POINT, dict.fromkeys(candidates, RANK), None, lifecycle)
                          for cid in range(CLIENTS)])  # fmt: skip

        def one(batch, clients=clients, engine=engine) -> None:
            clients[0].batches = iter([batch])
            engine.split_step(0)

        split[lifecycle] = tokens / timed(one, feed, warmup, device)
    adapter_params = sum(p.numel() for p in clients[0].parameters()) + sum(p.numel() for p in server.parameters(0))

    def every(batch) -> None:
        for client in clients:
            client.batches = iter([batch])
        engine.step_all()

    rounds = feed[: max(warmup + 2, len(feed) // 2)]
    seconds = timed(every, rounds, warmup, device)
    interleaved = CLIENTS * sum(b.input_ids.numel() for b in rounds[warmup:]) / seconds
    engine.shutdown()
    return split["anchor"], split["overwrite"], interleaved, adapter_params


def memory_case(name: str, split_point: int, rank: int, batch: int, seq: int, device: torch.device) -> tuple[int, int]:
    """(predicted, measured) bytes of one client holding blocks [0, s) with rank-r adapters."""
    from hsplitlora.lora.attach import attach_lora, set_active_adapter
    from hsplitlora.method.memory import measure_memory_model
    from hsplitlora.models.architectures import architecture_of
    from hsplitlora.models.split import ClientPart

    whole = build(name, device, torch.bfloat16)
    memory = measure_memory_model(whole, attach_lora(whole, TARGETS), batch, seq)
    predicted = memory.client_bytes(split_point, dict.fromkeys(memory.client_side(split_point), rank))
    del whole
    release()

    base = torch.cuda.memory_allocated(device)
    model = build(name, device, torch.bfloat16, num_blocks=split_point)
    if not model.config.tie_word_embeddings:
        model.lm_head = torch.nn.Identity()  # a client holds no head in the standard split
    release()
    arch = architecture_of(model)
    candidates = attach_lora(model, TARGETS)
    generator = torch.Generator(device).manual_seed(0)
    for candidate in candidates.values():
        model.get_submodule(candidate.module).set_adapter("c", candidate.slot, rank, ALPHA, generator)
    part = ClientPart(arch, model, split_point)
    set_active_adapter(part, "c")
    optimizer = torch.optim.AdamW([p for p in part.parameters() if p.requires_grad], lr=LR)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    mask = torch.ones_like(ids)
    torch.cuda.reset_peak_memory_stats(device)
    for _ in range(3):
        hidden = part(ids, mask)
        hidden.backward(torch.randn_like(hidden))  # the gradient the main server sends back
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    measured = torch.cuda.max_memory_allocated(device) - base
    del model, part, optimizer, hidden
    release()
    return predicted, measured


def release() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_flops(device: torch.device, given: float | None) -> float | None:
    if given:
        return given * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((rate for key, rate in PEAK_BF16.items() if key in name), None)


def measure_speeds(name: str, args, device: torch.device, dtype: torch.dtype) -> Speeds:
    started = time.perf_counter()
    model = build(name, device, dtype)
    feed = batches(args.warmup + args.steps, args.batch, args.seq, model.config.vocab_size, seed=0)
    peft, model = peft_speed(model, feed, args.warmup, device)
    release()
    split, plain, interleaved, adapter_params = split_speeds(model, feed, args.warmup, device)
    peak = peak_flops(device, args.peak_tflops)
    mfu = split * flops_per_token(model, args.seq, adapter_params) / peak if peak else float("nan")
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    print(f"{name} ({params / 1e9:.2f} B parameters, {dtype}, batch {args.batch} x {args.seq}): "
          f"peft {peft:,.0f} tokens/s, split (cut {SPLIT_POINT}) {split:,.0f} tokens/s "
          f"({split / peft:.3f} of peft; plain adapters {plain:,.0f}, {plain / peft:.3f}), "
          f"{CLIENTS} clients interleaved {interleaved:,.0f} tokens/s, "
          f"MFU of the split step {mfu:.3f}; {time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
    del model
    release()
    return Speeds(peft, split, plain, interleaved, mfu)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="llama-3.2-1b,qwen2.5-1.5b,llama-2-7b",
                        help=f"comma-separated, of {', '.join(CONFIGS)}")  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="the tiny config only (the CPU check of this script)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each loop (6)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s (default by its name)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory model comparison")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    if not cuda:
        print(f"no GPU here: torch {torch.__version__} sees no CUDA device; running the tiny config on the CPU "
              "(the same code path; no memory part).")  # fmt: skip
    device = torch.device("cuda" if cuda else "cpu")
    names = ["tiny"] if args.tiny or not cuda else args.models.split(",")
    if names == ["tiny"] and not cuda:
        args.batch, args.seq, args.steps, args.warmup = min(args.batch, 2), min(args.seq, 32), min(args.steps, 2), 1
    dtype = torch.bfloat16 if cuda else torch.float32
    if cuda:
        print(f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}", flush=True)
    speeds, failures = {}, []
    for name in names:  # one model failing (out of memory, say) still leaves the others' figures
        try:
            speeds[name] = measure_speeds(name, args, device, dtype)
        except Exception as error:  # noqa: BLE001 - reported, and the exit status says so
            failures.append(f"{name}: {type(error).__name__}: {error}")
            print(f"{name} FAILED: {failures[-1]}", flush=True)
            release()

    worst = None
    if cuda and not args.no_memory:
        cases = [case for case in MEMORY_CASES if case[0] in names] or [("tiny", 2, 8), ("tiny", 4, 16)]
        worst = 0.0
        print(f"memory model against torch.cuda.max_memory_allocated (batch {args.batch} x {args.seq}, bf16 "
              "weights, float32 adapters on q,k,v,o of the client's blocks):")  # fmt: skip
        for name, split_point, rank in cases:
            try:
                predicted, measured = memory_case(name, split_point, rank, args.batch, args.seq, device)
            except Exception as error:  # noqa: BLE001 - reported, and the exit status says so
                failures.append(f"memory {name} cut {split_point}: {type(error).__name__}: {error}")
                print(f"  FAILED: {failures[-1]}", flush=True)
                release()
                continue
            error = abs(predicted - measured) / measured
            worst = max(worst, error)
            print(f"  {name} cut {split_point} rank {rank}: predicted {predicted / 2**20:,.1f} MiB, "
                  f"measured {measured / 2**20:,.1f} MiB, error {error:.3f}", flush=True)  # fmt: skip

    if speeds:
        plain = min(s.plain / s.peft for s in speeds.values())
        print(f"plain adapters (splitlora's): split over peft at least {plain:.3f}")
        print(f"RESULT gpu_split_vs_peft_ratio={min(s.split / s.peft for s in speeds.values()):.3f}")
        print(f"RESULT gpu_mfu={speeds[list(speeds)[-1]].mfu:.3f}")
    if worst is not None:
        print(f"RESULT gpu_memory_model_max_rel_error={worst:.3f}")
    for failure in failures:
        print(f"failed: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
