"""`hsplitlora eval RUN_DIR`: perplexity, generation and the five E2E metrics of a run's final
merged model on testset_w_refs.csv; writes predictions.txt and eval.json into the run folder."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from hsplitlora.data.e2e import collate, data_file, encode_many, prompt_text, read_e2e
from hsplitlora.data.records import prompt_of
from hsplitlora.data.sources import load_training_data
from hsplitlora.errors import UsageError
from hsplitlora.evaluation.e2e_metrics import score_e2e
from hsplitlora.evaluation.generation import GenerationSettings, generate
from hsplitlora.evaluation.perplexity import evaluate_loss, model_forward, perplexity
from hsplitlora.folders import check_foreign, check_kind, check_not_inside, check_output_name, kind_of, record
from hsplitlora.lora.attach import attach_lora, set_active_adapter
from hsplitlora.models.loading import LoadedModel, load_model
from hsplitlora.reporting import check_output_folder, read_json, read_tensors, refuse_clobbering, write_json_atomic

EVAL_FILES = ("eval.json", "predictions.txt")


def weights_format(path: str | Path) -> str:
    """What a run's model.safetensors holds, as its strategy exported it: every weight (full) or
    the candidates' merged weights (candidates)."""
    with safe_open(path, framework="pt") as handle:
        return (handle.metadata() or {}).get("format", "candidates")


def load_run_model(run_dir: str | Path) -> tuple[LoadedModel, dict]:
    """The base model with the run's final merged candidate weights in place."""
    run_dir = Path(run_dir)
    config_path, weights_path = run_dir / "config.json", run_dir / "model.safetensors"
    if not config_path.is_file() or not weights_path.is_file():
        raise UsageError(
            f"{run_dir} is not a finished run folder; it needs config.json and model.safetensors "
            "(written by hsplitlora run when its last round ends)."
        )
    config = read_json(config_path, "run config")
    if not isinstance(config.get("model"), str) or not isinstance(config.get("targets"), list):
        raise UsageError(f"run config {config_path} names no model and targets; the file is damaged.")
    tensors = read_tensors(weights_path, "run weights")
    export_format = weights_format(weights_path)
    loaded = load_model(config["model"], seed=config.get("seed", 0), dtype=config.get("dtype", "float32"))
    candidates = attach_lora(loaded.model, config["targets"])
    with torch.no_grad():
        if export_format == "full":  # full fine-tuning changed every weight
            unexpected = loaded.model.load_state_dict(tensors, strict=False).unexpected_keys
            if unexpected:
                raise UsageError(f"{weights_path} holds {unexpected[0]!r}, which this model does not have.")
        else:
            for name, weight in tensors.items():
                if name not in candidates:
                    raise UsageError(f"{weights_path} holds {name!r}, which this model does not have.")
                candidate = candidates[name]
                target = loaded.model.get_submodule(candidate.module).weight(candidate.slot)
                if target.shape != weight.shape:
                    raise UsageError(
                        f"{weights_path} holds {name!r} of shape {tuple(weight.shape)}, but the model's is "
                        f"{tuple(target.shape)}; the run folder and its config do not match."
                    )
                target.copy_(weight)
    set_active_adapter(loaded.model, None)
    return loaded, config


def evaluate_run(
    run_dir: str | Path,
    limit: int | None = None,
    settings: GenerationSettings | None = None,
    on_generated: Callable[[int, int], None] | None = None,
    data_dir: str | Path | None = None,
    output: str | Path | None = None,
    overwrite: bool = False,
    device: str = "cpu",
) -> dict:
    """Perplexity on the test references of the first `limit` MRs (all by default), beam-search
    outputs for those MRs and their five E2E metrics, written to `output` (default: the run
    folder); test data from `data_dir` (default: the run's)."""
    run_dir = Path(run_dir)
    check_output_name(output, "--output", str(run_dir))
    output = check_output_folder(Path(output) if output is not None else run_dir, "eval output folder")
    own = output.resolve() == run_dir.resolve()
    if not own:
        check_not_inside(output, "eval output folder")
        if kind_of(output) == "run":
            raise UsageError(f"eval output folder {output} is the folder of another run, not of {run_dir}; choose a "
                             f"folder of its own (or leave --output out to write into {run_dir}).")  # fmt: skip
        check_kind(output, "eval", "eval output folder")
    check_foreign(output, EVAL_FILES, "an evaluation file", "give --output DIR to write elsewhere, or move it away.")
    if not overwrite:
        refuse_clobbering(output, EVAL_FILES, "an evaluation",
                          "give --overwrite to replace it, or --output DIR to write elsewhere.")  # fmt: skip
    check_eval_data(run_dir, data_dir)
    rows = read_e2e(data_file(data_dir, "test")) if data_dir else None
    from hsplitlora.placement import check_available, parse_device

    where = parse_device(device)
    check_available(where)
    loaded, config = load_run_model(run_dir)
    settings = settings or GenerationSettings()
    if where.type == "cpu":
        from hsplitlora.resources import check_fits, generation_bytes

        needed = generation_bytes(loaded.model, settings.batch_size, settings.num_beams, config.get("max_seq_len", 128),
                                  settings.max_new_tokens)  # fmt: skip
        check_fits(needed, f"beam search with {settings.num_beams} beams over batches of {settings.batch_size}",
                   "lower --beams or --batch-size.")  # fmt: skip
    loaded.model.to(where)
    if config.get("data", "e2e") == "e2e" and not config.get("client_data"):
        rows = rows or read_e2e(data_file(config.get("data_dir"), "test"))
        grouped: dict[str, list[str]] = {}
        for row in rows:
            grouped.setdefault(row.mr, []).append(row.ref)
        mrs = list(grouped)[:limit] if limit else list(grouped)
        kept = set(mrs)
        items = encode_many([row for row in rows if row.mr in kept], loaded.tokenizer, config.get("max_seq_len", 128))
        prompts = [prompt_text(mr) for mr in mrs]
        references = [grouped[mr] for mr in mrs]
        described = "testset_w_refs.csv (the model was trained on devset.csv)"
    else:  # your own data: the run's validation records, each with its one response as reference
        data = load_training_data(run_config(config), loaded.tokenizer)
        records = data.validation_records[:limit] if limit else data.validation_records
        items = data.validation[: len(records)]
        prompts = [prompt_of(record, loaded.tokenizer) for record in records]
        references = [[record.reference] for record in records]
        described = data.description
    batch_size = config.get("batch_size", 8)
    batches = [
        collate(items[i : i + batch_size], loaded.tokenizer.pad_token_id) for i in range(0, len(items), batch_size)
    ]
    loss, tokens = evaluate_loss(model_forward(loaded.model), batches)

    done = 0

    def progress(count: int) -> None:
        nonlocal done
        done += count
        if on_generated is not None:
            on_generated(done, len(prompts))

    predictions = generate(loaded.model, loaded.tokenizer, [], settings, progress, prompts=prompts)
    scores = score_e2e(references, predictions)
    record(output, "run" if own else "eval", EVAL_FILES)
    (output / "predictions.txt").write_text("\n".join(predictions) + "\n")
    result = {
        "loss": loss,
        "perplexity": perplexity(loss),
        "target_tokens": tokens,
        "references": len(items),
        "mrs": len(prompts),
        "metrics": scores,
        "generation": vars(settings),
        "data": described,
    }
    write_json_atomic(output / "eval.json", result)
    return {**result, "output": str(output)}


def check_eval_data(run_dir: Path, data_dir: str | Path | None) -> None:
    """Before the model loads: --data-dir (E2E's test set) only for a run on E2E, and no data file
    eval reads changed since the run started."""
    from hsplitlora.data.fingerprint import check_fingerprints

    config_path = run_dir / "config.json"
    if not config_path.is_file():
        return  # load_run_model says what a finished run folder needs
    config = read_json(config_path, "run config")
    own = config.get("client_data") or (config.get("data") if config.get("data", "e2e") != "e2e" else None)
    if data_dir is not None and own:
        raise UsageError(f"--data-dir names E2E's test set, and {run_dir} trained on your own data ({own}), which "
                         "eval validates on as the run did; drop --data-dir.")  # fmt: skip
    resolved = config.get("resolved")
    if data_dir is None or own:  # a --data-dir of the user's choice replaces the run's test file
        check_fingerprints(resolved.get("data_files") if isinstance(resolved, dict) else None, "evaluate",
                           only_e2e_test=not own)  # fmt: skip


def run_config(saved: dict):
    """The RunConfig a run folder's config.json describes (without its `resolved` block)."""
    from hsplitlora.config import RunConfig, config_fields

    known = config_fields()
    return RunConfig(**{key: value for key, value in saved.items() if key in known})
