"""`hsplitlora export RUN_DIR --merged OUT`: the run's final merged model as a standard Hugging Face
folder (config, safetensors, tokenizer) that `AutoModelForCausalLM.from_pretrained` loads."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hsplitlora.errors import UsageError
from hsplitlora.evaluation.run_eval import load_run_model
from hsplitlora.lora.attach import detach_lora


def export_merged(run_dir: str | Path, out_dir: str | Path) -> Path:
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise UsageError(f"export folder {out_dir} exists and is not empty; choose a new folder.")
    loaded, _ = load_run_model(run_dir)
    model = detach_lora(loaded.model)
    for param in model.parameters():
        param.requires_grad_(False)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place: a crash leaves no half-written model.
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        loaded.tokenizer.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out_dir
