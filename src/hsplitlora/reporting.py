"""The run folder: resolved config, metrics.jsonl, summary.json, checkpoints (safetensors + JSON,
written atomically) and the plots a person looks at."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hsplitlora.errors import UsageError, read_text

# What a run writes into its folder; a folder holding any of these holds a run.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoint", ".checkpoint-old")
RUN_OUTPUTS = (*RUN_FILES, "val_ppl.png", "plan.png", "eval.json", "predictions.txt")
RUN_MARKERS = ("metrics.jsonl", "summary.json", "checkpoint", ".checkpoint-old")  # a run, not a model folder


def finite_json(data):
    """`data` with every NaN or infinity replaced by None: JSON has no such numbers."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite_json(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(value) for value in data]
    return data


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Refuse, before anything is computed, an output path that is a file, lies under a file or
    cannot be written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path} is a file, not a folder; give the path of a folder.")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{what} {path} lies under {existing}, which is a file; give the path of a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} cannot be written: {existing} is read-only; give a folder you can write.")
    return path


def holds_run(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and any((path / name).exists() for name in RUN_MARKERS)


def refuse_clobbering(path: str | Path, names: tuple[str, ...], what: str, remedy: str) -> None:
    """Refuse to write into `path` when it already holds one of `names`."""
    path = Path(path)
    found = [name for name in names if (path / name).exists()]
    if found:
        raise UsageError(f"{path} already holds {what} ({found[0]}); {remedy}")


def write_json_atomic(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False) as handle:
        json.dump(finite_json(data), handle, indent=2)
        temporary = handle.name
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def write_tensors_atomic(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, temporary,
              metadata={k: str(v) for k, v in (metadata or {}).items()})  # fmt: skip
    os.chmod(temporary, 0o644)
    os.replace(temporary, path)


def read_json(path: Path, what: str = "file", kind: type = dict):
    """A JSON file written by this tool, or one sentence naming it when it is missing or damaged."""
    text = read_text(path, what)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, kind):
        state = "empty" if not text.strip() else "not valid JSON of the expected shape"
        raise UsageError(f"{what} {path} is {state}; the file is damaged (restore it or start a new run).")
    return data


def read_tensors(path: Path, what: str = "weights") -> dict[str, torch.Tensor]:
    """A safetensors file, or one sentence naming it when it is missing, truncated or garbled."""
    if not Path(path).is_file():
        raise UsageError(f"{what} {path} does not exist.")
    try:
        return load_file(path)
    except Exception as error:  # safetensors raises its own SafetensorError and OSError subclasses
        raise UsageError(
            f"{what} {path} is not a readable safetensors file ({error.__class__.__name__}); "
            "it is truncated or damaged."
        ) from None


class RunFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)  # created by the first write, not before

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict) -> None:
        write_json_atomic(self.path / "config.json", config)

    def rewrite_metrics(self, lines: list[dict]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self.metrics_path.with_name(".metrics.jsonl.tmp")
        temporary.write_text("".join(json.dumps(finite_json(line)) + "\n" for line in lines))
        os.replace(temporary, self.metrics_path)

    def append_metrics(self, line: dict) -> None:
        with self.metrics_path.open("a") as handle:
            handle.write(json.dumps(finite_json(line)) + "\n")

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        lines = []
        for number, line in enumerate(read_text(self.metrics_path).splitlines(), 1):
            if line.strip():
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    raise UsageError(
                        f"{self.metrics_path} line {number} is not valid JSON; the file is damaged."
                    ) from None
        return lines

    def clear(self) -> None:
        """Remove what an earlier run wrote here (only a run's own files), for --overwrite."""
        for name in RUN_OUTPUTS:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()

    def checkpoint_folder(self) -> Path | None:
        folder = self.path / "checkpoint"
        if not folder.exists() and (self.path / ".checkpoint-old").exists():
            folder = self.path / ".checkpoint-old"  # a crash between the two renames
        return folder if folder.exists() else None

    def checkpoint_state(self) -> dict:
        """state.json of the last checkpoint (a sentence if it is missing or damaged)."""
        folder = self.checkpoint_folder()
        if folder is None:
            raise UsageError(f"{self.path} holds no checkpoint of a finished round to resume from.")
        with self._offer_previous(folder):
            return read_json(folder / "state.json", "checkpoint state")

    @contextmanager
    def _offer_previous(self, folder: Path):
        """A damaged checkpoint's sentence names an earlier complete one where a crash left it."""
        try:
            yield
        except UsageError as error:
            previous = self.path / ".checkpoint-old"
            if folder != previous and (previous / "state.json").is_file():
                raise UsageError(f"{str(error).rstrip('.')}; an earlier complete checkpoint is in {previous}: rename "
                                 "it to checkpoint to resume from the round before.") from None  # fmt: skip
            raise

    def save_checkpoint(self, state: dict, tensors: dict[str, torch.Tensor]) -> None:
        """checkpoint/ = weights.safetensors + state.json, replaced as a whole: a crash leaves the
        previous complete checkpoint."""
        self.path.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.path, prefix=".checkpoint-"))
        os.chmod(staging, 0o755)
        write_tensors_atomic(staging / "weights.safetensors", tensors)
        write_json_atomic(staging / "state.json", state)
        final = self.path / "checkpoint"
        previous = self.path / ".checkpoint-old"
        if final.exists():
            os.replace(final, previous)
        os.replace(staging, final)
        if previous.exists():
            shutil.rmtree(previous)

    def load_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        state = self.checkpoint_state()
        with self._offer_previous(self.checkpoint_folder()):
            tensors = read_tensors(self.checkpoint_folder() / "weights.safetensors", "checkpoint weights")
        for staging in self.path.glob(".checkpoint-*"):  # half-written by a killed run
            if staging.name != ".checkpoint-old" and staging.is_dir():
                shutil.rmtree(staging)
        return state, tensors

    def plot(self, metrics: list[dict]) -> list[Path]:
        """val_ppl vs round and vs simulated time; each client's split point and total rank."""
        from hsplitlora.plots import plot_run

        return plot_run(metrics, self.path)
