"""Quantized frozen blocks on a GPU: the same quantized values as on the CPU, split equivalence with
int8 / nf4 client blocks on the GPU, and the step time and peak memory of a client part of 4
LLaMA-2-7B-sized blocks (random weights, nothing downloaded) held bfloat16, int8 and nf4 (float
weights freed: `hold_quantized`), rank-8 adapters on q, k, v, o, batch 8 x 512, AdamW.

On a lent GPU machine without network (its own torch), carry bitsandbytes' Python files with
`libbitsandbytes_cuda130.so` in `.qgpu/bitsandbytes` and the transformers 5.23.0 wheel in `.whl/`:

    python3 -m pip install --no-deps --target /tmp/site .whl/transformers-5.23.0-py3-none-any.whl
    python3 benchmarks/gpu_quant.py --out $OUT/quant_gpu.json

Where torch sees no GPU it says so and exits 0; `--small` runs the same code on the CPU at small sizes.
"""

import json
import sys
import time

sys.path[:0] = ["/tmp/site", ".qgpu", "src"]  # the carried packages on the GPU machine; src: this checkout
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from hsplitlora.lora.attach import attach_lora, lora_layers, set_active_adapter, wrap_frozen_linears  # noqa: E402
from hsplitlora.lora.quant import quantize  # noqa: E402
from hsplitlora.losses import target_token_loss  # noqa: E402
from hsplitlora.models.architectures import architecture_of  # noqa: E402
from hsplitlora.models.split import ClientPart, split_model  # noqa: E402

small = "--small" in sys.argv
if not small and not torch.cuda.is_available():
    print("no GPU here; --small runs the same checks on the CPU at small sizes")
    sys.exit(0)
device = "cpu" if small else "cuda"
out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__}

# 1. The GPU quantizes to the values the CPU does.
g = torch.Generator().manual_seed(0)
for kind in ("int8", "nf4"):
    for shape in ((96, 80), (576, 1536)):
        w = torch.randn(*shape, generator=g) * 0.02
        cpu = quantize(w, kind).dequantize()
        gpu = quantize(w.to(device), kind).dequantize().cpu()
        results[f"same_values_{kind}_{shape[0]}x{shape[1]}"] = float((cpu - gpu).abs().max())
        results[f"rel_error_{kind}_{shape[0]}x{shape[1]}"] = float((gpu - w).norm() / w.norm())
print(json.dumps(results), flush=True)


# 2. Split equivalence with quantized client blocks, on the device.
def tiny():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    attach_lora(model, ["q", "k", "v", "o", "up", "down"])
    wrap_frozen_linears(model)
    gen = torch.Generator().manual_seed(1)
    for name, module in model.named_modules():
        if hasattr(module, "set_adapter") and any(
            t in name for t in ("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj")
        ):
            for slot in module.slot_bounds:
                module.set_adapter("a", slot, 4, 16.0, gen)
                with torch.no_grad():
                    b = module.lora_B[slot]["a"]
                    b.copy_(torch.randn(b.shape, generator=gen) * 0.05)
    return model


ids = torch.randint(0, 256, (2, 16), generator=g).to(device)
mask = torch.ones_like(ids)
for kind in ("int8", "nf4"):
    model = tiny()
    for index, block in enumerate(architecture_of(model).blocks(model)):
        for layer in lora_layers(block):
            layer.quant = kind if index < 2 else "none"
    set_active_adapter(model, "a")
    reference = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    reference.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    client, server = split_model(model, 2)
    client.quant = kind
    hidden = client(ids, mask)
    received = hidden.detach().requires_grad_(True)
    total, count = target_token_loss(server(received, mask), ids)
    (total / count).backward()
    hidden.backward(received.grad)
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    results[f"split_loss_diff_{kind}"] = float((total / count - reference).abs().detach())
    results[f"split_grad_max_diff_{kind}"] = max(float((got[n] - expected[n]).abs().max()) for n in expected)
print(json.dumps(results), flush=True)

# 3. Step time and peak memory of 4 blocks, float weights freed when quantized.
dims = (
    dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=4)
    if small
    else dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
)
batch, seq = (2, 32) if small else (8, 512)
for kind in ("none", "int8", "nf4"):
    if device == "cuda":
        torch.cuda.empty_cache()
    config = LlamaConfig(vocab_size=32000, num_hidden_layers=4, max_position_embeddings=4096, **dims)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    for p in model.parameters():
        p.requires_grad_(False)
    attach_lora(model, ["q", "k", "v", "o"])
    wrap_frozen_linears(model)
    gen = torch.Generator().manual_seed(0)
    for layer in lora_layers(model):
        if kind != "none":
            layer.hold_quantized(kind)
    for name, module in model.named_modules():
        if any(t in name for t in ("q_proj", "k_proj", "v_proj", "o_proj")) and hasattr(module, "set_adapter"):
            module.set_adapter("a", "main", 8, 16.0, gen)
    part = ClientPart(architecture_of(model), model, 4)
    part.quant = kind
    set_active_adapter(part, "a")
    params = [p for p in part.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = torch.randint(0, 32000, (batch, seq), device=device)
    m = torch.ones_like(x)
    weights = sum(p.numel() * p.element_size() for n, p in model.model.layers.named_parameters() if "lora_" not in n)
    weights += sum(layer.held.nbytes for layer in lora_layers(model) if layer.held is not None)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for step in range(7):
        start = time.perf_counter()
        hidden = part(x, m)
        hidden.backward(torch.ones_like(hidden))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - start)
    results[f"step_ms_{kind}"] = 1e3 * sum(times) / len(times)
    results[f"block_weight_mib_{kind}"] = weights / 2**20
    if device == "cuda":
        results[f"peak_mib_{kind}"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(results), flush=True)
    del model, part, optimizer, params
if out:
    with open(out, "w") as handle:
        json.dump(results, handle, indent=1)
