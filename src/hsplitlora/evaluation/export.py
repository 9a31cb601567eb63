"""`hsplitlora export RUN_DIR --merged OUT`: the run's final merged model as a standard Hugging Face
folder (config, safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

from pathlib import Path

from hsplitlora.errors import UsageError
from hsplitlora.evaluation.run_eval import load_run_model, weights_format
from hsplitlora.folders import (
    check_holds_no_run,
    check_kind,
    check_not_inside,
    check_output_name,
    kind_of,
    write_folder,
)
from hsplitlora.lora.attach import detach_lora
from hsplitlora.models.loading import save_pretrained_atomic
from hsplitlora.reporting import check_output_folder, holds_run


def check_export_folder(run_dir: str | Path, out_dir: str | Path, overwrite: bool) -> Path:
    """An export goes to a new or empty folder, or (with `overwrite`) to a folder an earlier export
    wrote, where it replaces only the files that export's manifest lists; never a run's folder,
    nor inside a run's or an export's folder, nor a folder holding a run."""
    check_output_name(out_dir, "the export folder (--merged or --adapter)")
    out_dir = check_output_folder(out_dir, "export folder")
    if holds_run(out_dir) or out_dir.resolve() == Path(run_dir).resolve():
        raise UsageError(f"export folder {out_dir} holds a run; choose a new folder for the export.")
    check_not_inside(out_dir, "export folder")
    check_holds_no_run(out_dir, "export folder")
    check_kind(out_dir, "export", "export folder")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(
                f"export folder {out_dir} exists and is not empty; choose a new folder or give --overwrite."
            )
        if kind_of(out_dir) != "export":
            raise UsageError(
                f"export folder {out_dir} holds files but no earlier export of hsplitlora (no manifest); "
                "--overwrite replaces only an earlier export, so choose a new or empty folder."
            )
    return out_dir


def export_merged(run_dir: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    out_dir = check_export_folder(run_dir, out_dir, overwrite)
    loaded, _ = load_run_model(run_dir)
    model = detach_lora(loaded.model)
    for param in model.parameters():
        param.requires_grad_(False)
    # An earlier export that --overwrite allows is replaced (its files only; the rest stays).
    save_pretrained_atomic(model, loaded.tokenizer, out_dir, kind="export")
    return out_dir


def export_adapter(run_dir: str | Path, out_dir: str | Path, rank: int, overwrite: bool = False) -> dict[str, float]:
    """The whole fine-tuning update as a standard peft LoRA adapter: per wrapped module, the
    accumulated dW = W_trained - W_base compressed by truncated SVD to `rank` (B = U_r S_r,
    A = V_r^T, alpha = r so the scale is 1). Returns each module's relative Frobenius error
    ||dW - B A|| / ||dW|| (0 for an unchanged module)."""

    import torch
    from peft import LoraConfig, get_peft_model

    from hsplitlora.lora.layer import MultiLoRALayer
    from hsplitlora.models.loading import load_model
    from hsplitlora.reporting import write_json_atomic

    if rank < 1:
        raise UsageError(f"rank must be a positive integer, got {rank}.")
    out_dir = check_export_folder(run_dir, out_dir, overwrite)
    trained, config = load_run_model(run_dir)
    if weights_format(Path(run_dir) / "model.safetensors") == "full":
        raise UsageError("a fully fine-tuned run changed every weight, not only LoRA targets; export it with --merged.")
    modules = {name: m for name, m in trained.model.named_modules() if isinstance(m, MultiLoRALayer)}
    largest = max(min(m.base.weight.shape) for m in modules.values())
    if rank > largest:
        raise UsageError(
            f"rank {rank} exceeds {largest}, the full rank min(d_in, d_out) of the largest adapted matrix of this "
            f"model; use at most {largest}."
        )
    if any(m.transposed for m in modules.values()) and not all(m.transposed for m in modules.values()):
        raise UsageError("the run mixes Linear and Conv1D targets; export them as a merged model instead.")
    base = load_model(config["model"], seed=config.get("seed", 0), dtype=config.get("dtype", "float32")).model
    peft_config = LoraConfig(
        r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=sorted(modules),
        fan_in_fan_out=all(m.transposed for m in modules.values()),
    )  # fmt: skip
    peft_model = get_peft_model(base, peft_config)
    errors: dict[str, float] = {}
    with torch.no_grad():
        for name, layer in modules.items():
            delta = layer.base.weight - base.get_submodule(name).base_layer.weight
            if layer.transposed:  # Conv1D stores (d_in, d_out)
                delta = delta.T
            u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
            r = min(rank, s.numel())
            b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
            a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
            b[:, :r], a[:r] = u[:, :r] * s[:r], vh[:r]
            target = base.get_submodule(name)
            target.lora_A["default"].weight.copy_(a)
            target.lora_B["default"].weight.copy_(b)
            norm = torch.linalg.norm(delta.double())
            errors[name] = float(torch.linalg.norm(delta.double() - b @ a) / norm) if norm > 0 else 0.0

    def write(staging: Path) -> None:
        peft_model.save_pretrained(staging)
        write_json_atomic(staging / "approximation_error.json", {"rank": rank, "relative_frobenius_error": errors})

    write_folder(out_dir, "export", write, last="adapter_model.safetensors")
    return errors
