"""The run folder: resolved config, metrics.jsonl, summary.json, checkpoints (safetensors + JSON,
written atomically) and the plots a person looks at."""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hsplitlora import folders
from hsplitlora.errors import UsageError, read_text

# What a run writes into its folder: refused without --overwrite, replaced only where the tool wrote it.
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "checkpoint", ".checkpoint-old")
RUN_NAMES = (*RUN_FILES, ".checkpoint-new", "val_ppl.png", "plan.png")


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
    """A run's folder: its manifest says so, or (written before manifests) its complete set of files."""
    return folders.kind_of(path) == "run"


def check_run_folder(path: str | Path, resume: bool = False, overwrite: bool = False) -> Path:
    """A run goes to a new folder, a folder of someone else's files it does not replace, or (with
    --overwrite or --resume) a run's folder; never inside a run's or an export's folder, never into
    a folder holding another run or another kind of the tool's folders."""
    path = check_output_folder(path, "run folder")
    if resume:
        return path
    folders.check_not_inside(path, "run folder")
    folders.check_kind(path, "run", "run folder")
    folders.check_holds_no_run(path, "run folder")
    folders.check_foreign(path, RUN_NAMES, "a file", "choose another --output-dir, or move that file away.")
    if not overwrite:
        remedy = f"give --overwrite to replace it, --resume {path} to continue it, or another --output-dir."
        refuse_clobbering(path, RUN_FILES, "a run's files", remedy)
    return path


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
        self.recorded: set[str] = set()

    def record(self, *files: str) -> None:
        """Names the run is about to write, added to the folder's manifest (once each)."""
        new = [name for name in files if name not in self.recorded]
        if new:
            folders.record(self.path, "run", new)
            self.recorded.update(new)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, config: dict) -> None:
        self.record("config.json")
        write_json_atomic(self.path / "config.json", config)

    def rewrite_metrics(self, lines: list[dict]) -> None:
        self.record("metrics.jsonl")
        temporary = self.metrics_path.with_name(".metrics.jsonl.tmp")
        temporary.write_text("".join(json.dumps(finite_json(line)) + "\n" for line in lines))
        os.replace(temporary, self.metrics_path)

    def append_metrics(self, line: dict) -> None:
        self.record("metrics.jsonl")
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
        """Remove what an earlier run wrote here (the files its manifest lists), for --overwrite."""
        folders.clear(self.path)
        self.recorded.clear()

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
        previous complete checkpoint. A file someone else put in checkpoint/ moves into the new one."""
        self.record(*(f"{name}/{file}" for name in folders.CHECKPOINT_FOLDERS for file in folders.CHECKPOINT_FILES))
        staging = self.path / ".checkpoint-new"
        staging.mkdir(mode=0o755, exist_ok=True)  # one a killed run left is written again
        write_tensors_atomic(staging / "weights.safetensors", tensors)
        write_json_atomic(staging / "state.json", state)
        final = self.path / "checkpoint"
        previous = self.path / ".checkpoint-old"
        for old in (previous, final):
            if old.is_dir():
                for entry in old.iterdir():
                    if not _checkpoint_file(entry.name):
                        os.replace(entry, staging / entry.name)  # not the tool's: it stays in the checkpoint
        _discard_checkpoint(previous)  # left by a crash between the renames below
        if final.exists():
            os.replace(final, previous)
        os.replace(staging, final)
        _discard_checkpoint(previous)

    def load_checkpoint(self) -> tuple[dict, dict[str, torch.Tensor]]:
        state = self.checkpoint_state()
        with self._offer_previous(self.checkpoint_folder()):
            tensors = read_tensors(self.checkpoint_folder() / "weights.safetensors", "checkpoint weights")
        for staging in self.path.glob(".checkpoint-*"):  # half-written by a killed run
            if staging.name != ".checkpoint-old" and staging.is_dir():
                _discard_checkpoint(staging)
        return state, tensors

    def plot(self, metrics: list[dict]) -> list[Path]:
        """val_ppl vs round and vs simulated time; each client's split point and total rank."""
        from hsplitlora.plots import plot_run

        self.record("val_ppl.png", "plan.png")
        return plot_run(metrics, self.path)


def _checkpoint_file(name: str) -> bool:
    """A file the tool writes in a checkpoint folder (or the temporary file it renames into one)."""
    return name in folders.CHECKPOINT_FILES or any(name.startswith(f".{file}.") for file in folders.CHECKPOINT_FILES)


def _discard_checkpoint(folder: Path) -> None:
    """Remove the tool's files from a checkpoint folder, and the folder once it is empty."""
    if not folder.is_dir():
        return
    for entry in folder.iterdir():
        if _checkpoint_file(entry.name) and entry.is_file():
            entry.unlink()
    if not any(folder.iterdir()):
        folder.rmdir()
