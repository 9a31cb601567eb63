"""What the tool wrote, and where it may write: every folder it writes (run, comparison, eval
output, export) holds a manifest of the files it wrote there; `--overwrite` removes only those.

A folder without a manifest is never taken for a run, except a run written before manifests
existed, recognised by its complete set of run files (`legacy_kind`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from hsplitlora.errors import UsageError

MANIFEST = ".hsplitlora-manifest.json"
KINDS = {"run": "a run", "comparison": "a comparison", "eval": "an evaluation", "export": "an export",
         "model": "a converted model"}  # fmt: skip
# What a run writes (files, then folders), as `RunFolder` names them; a run written before manifests
# is recognised by config.json, metrics.jsonl and a summary or a checkpoint.
CHECKPOINT_FILES = ("weights.safetensors", "state.json")
CHECKPOINT_FOLDERS = ("checkpoint", ".checkpoint-old", ".checkpoint-new")
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "model.safetensors", "val_ppl.png", "plan.png",
             "eval.json", "predictions.txt",
             *(f"{folder}/{name}" for folder in CHECKPOINT_FOLDERS for name in CHECKPOINT_FILES))  # fmt: skip
COMPARISON_FILES = ("comparison.json", "comparison.png")


def _empty(kind: str) -> dict:
    return {"written_by": "hsplitlora", "kind": kind, "files": [], "folders": [], "runs": []}


def _relative(entry) -> bool:
    """A manifest entry names a path inside its folder (never absolute, never `..`)."""
    return isinstance(entry, str) and entry != "" and not Path(entry).is_absolute() and ".." not in Path(entry).parts


def read_manifest(folder: str | Path) -> dict | None:
    """The folder's manifest, None where it has none, one sentence where it is damaged."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None

    def entries_fit(key: str) -> bool:
        return isinstance(data.get(key, []), list) and all(map(_relative, data.get(key, [])))

    if (
        not isinstance(data, dict)
        or data.get("kind") not in KINDS
        or not all(map(entries_fit, ("files", "folders", "runs")))
    ):
        raise UsageError(f"manifest {path} is not the JSON hsplitlora writes; the file is damaged (restore it, or "
                         "remove the files hsplitlora wrote there and delete the manifest).")  # fmt: skip
    return {**_empty(data["kind"]), **data}


def _json_file(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def legacy_kind(folder: str | Path) -> str | None:
    """The kind ("run" or "comparison") of a folder written before manifests, by its complete set of files:
    a run's config.json (naming its strategy and model), metrics.jsonl and summary.json or a
    checkpoint; a comparison.json with its rows. None for anything else."""
    folder = Path(folder)
    if (folder / "config.json").is_file() and (folder / "metrics.jsonl").is_file():
        finished = (folder / "summary.json").is_file() or any(
            (folder / name / "state.json").is_file() for name in CHECKPOINT_FOLDERS)  # fmt: skip
        config = _json_file(folder / "config.json") if finished else None
        if config is not None and all(key in config for key in ("strategy", "model", "rounds")):
            return "run"
    if (folder / "comparison.json").is_file():
        comparison = _json_file(folder / "comparison.json")
        if comparison is not None and "target_ppl" in comparison and isinstance(comparison.get("rows"), list):
            return "comparison"
    return None


def _legacy_manifest(folder: Path, kind: str) -> dict:
    """What a folder written before manifests holds of the tool's files."""
    manifest = _empty(kind)
    if kind == "run":
        manifest["files"] = [name for name in RUN_FILES if (folder / name).is_file()]
        manifest["folders"] = [name for name in CHECKPOINT_FOLDERS if (folder / name).is_dir()]
    else:
        manifest["files"] = [name for name in COMPARISON_FILES if (folder / name).is_file()]
        rows = (_json_file(folder / "comparison.json") or {}).get("rows", [])
        names = [row.get("strategy") for row in rows if isinstance(row, dict)]
        manifest["runs"] = [n for n in names if _relative(n) and legacy_kind(folder / n) == "run"]
    return manifest


def manifest_of(folder: str | Path) -> dict | None:
    """The manifest, or what a folder written before manifests would list, or None."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        kind = legacy_kind(folder)
        manifest = _legacy_manifest(folder, kind) if kind else None
    return manifest


def kind_of(folder: str | Path) -> str | None:
    """Which of the tool's folders this is ("run", "comparison", ...), None for anyone else's."""
    manifest = manifest_of(folder) if Path(folder).is_dir() else None
    return manifest["kind"] if manifest else None


def owned_names(folder: str | Path) -> set[str]:
    """The top-level names in `folder` that the tool wrote."""
    manifest = manifest_of(folder)
    if manifest is None:
        return set()
    entries = [*manifest["files"], *manifest["folders"], *manifest["runs"]]
    return {Path(entry).parts[0] for entry in entries}


def _write_manifest(folder: Path, manifest: dict) -> None:
    """Written beside itself and renamed into place: a crash leaves the previous manifest."""
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("files", "folders", "runs"):
        manifest[key] = sorted(set(manifest[key]))
    with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f"{MANIFEST}.", delete=False) as handle:
        json.dump(manifest, handle, indent=2)
        temporary = handle.name
    os.chmod(temporary, 0o644)
    os.replace(temporary, folder / MANIFEST)


def record(folder: str | Path, kind: str, files: Iterable[str] = (), folders: Iterable[str] = (),
           runs: Iterable[str] = ()) -> None:  # fmt: skip
    """Add paths (relative to `folder`) to its manifest before the tool writes them, creating the
    folder and the manifest (of `kind`, or of the earlier run it holds) where there is none."""
    folder = Path(folder)
    manifest = manifest_of(folder) if folder.is_dir() else None
    manifest = manifest or _empty(kind)
    added = {"files": set(files), "folders": set(folders), "runs": set(runs)}
    for name in added["files"]:  # the folders a file lies in are the tool's too
        added["folders"].update(str(parent) for parent in Path(name).parents if str(parent) != ".")
    if all(added[key] <= set(manifest[key]) for key in added) and (folder / MANIFEST).is_file():
        return
    for key, values in added.items():
        manifest[key] = [*manifest[key], *values]
    _write_manifest(folder, manifest)


def forget(folder: str | Path, files: Iterable[str] = (), runs: Iterable[str] = ()) -> None:
    """Drop paths the tool removed from its manifest."""
    manifest = read_manifest(folder)
    if manifest is not None:
        manifest["files"] = [f for f in manifest["files"] if f not in set(files)]
        manifest["runs"] = [r for r in manifest["runs"] if r not in set(runs)]
        _write_manifest(Path(folder), manifest)


def _inside(folder: Path, relative: str) -> Path | None:
    """folder/relative when it lies inside `folder` once links are followed, else None."""
    path = folder / relative
    try:
        path.parent.resolve().relative_to(folder.resolve())
    except ValueError:
        return None
    return path


def clear(folder: str | Path) -> None:
    """Remove what the tool wrote in `folder` (its manifest's files, the sub-runs of a comparison,
    and the folders it created that are then empty); everything else stays as it is."""
    folder = Path(folder)
    manifest = manifest_of(folder) if folder.is_dir() else None
    if manifest is None:
        return
    for run in manifest["runs"]:
        sub = _inside(folder, run)
        if sub is not None and sub.is_dir() and kind_of(sub) == "run":
            clear(sub)
            if (sub / MANIFEST).is_file():
                (sub / MANIFEST).unlink()
            _remove_if_empty(sub)
    for name in manifest["files"]:
        path = _inside(folder, name)
        if path is not None and (path.is_file() or path.is_symlink()):
            path.unlink()
    for name in sorted(manifest["folders"], key=lambda n: len(Path(n).parts), reverse=True):
        path = _inside(folder, name)
        if path is not None and not path.is_symlink():
            _remove_if_empty(path)
    _write_manifest(folder, _empty(manifest["kind"]))


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def check_not_inside(folder: str | Path, what: str) -> None:
    """No output folder inside a run's or an export's folder (a checkpoint is replaced as a whole;
    an export is replaced by the next --overwrite)."""
    folder = Path(folder)
    for parent in folder.resolve().parents:
        owner = kind_of(parent)
        if owner in ("run", "export"):
            raise UsageError(f"{what} {folder} lies inside {parent}, the folder of {KINDS[owner]}; choose a folder "
                             "outside it.")  # fmt: skip


def check_holds_no_run(folder: str | Path, what: str) -> None:
    """A run or export folder never holds another run."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for here, _, names in os.walk(folder):
        here = Path(here)
        if here != folder and (MANIFEST in names or "config.json" in names) and kind_of(here) == "run":
            raise UsageError(f"{what} {folder} holds the run folder {here}; choose a folder that holds no run.")


def check_kind(folder: str | Path, kind: str, what: str) -> None:
    """A folder of the tool's is written again only by the command that wrote it."""
    owner = kind_of(folder)
    if owner is not None and owner != kind:
        raise UsageError(f"{what} {folder} holds {KINDS[owner]} written by hsplitlora; choose another folder.")


def check_foreign(folder: str | Path, names: Iterable[str], noun: str, remedy: str) -> None:
    """Refuse to replace a file the tool did not write, with or without --overwrite."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    owned = owned_names(folder)
    for name in names:
        if (folder / name).exists() and name not in owned:
            raise UsageError(f"{folder} already holds {noun} {name} that hsplitlora did not write (no manifest lists "
                             f"it); {remedy}")  # fmt: skip


def check_output_name(path: str | Path | None, flag: str, default: str | None = None) -> None:
    """An empty path is refused (it does not mean the default folder, nor the current one)."""
    if path is not None and not str(path).strip():
        instead = f" (or leave {flag} out to write into {default})" if default else ""
        raise UsageError(f"{flag} is an empty path; give the path of a folder{instead}.")


def write_folder(target: str | Path, kind: str, write: Callable[[Path], None], last: str = "model.safetensors") -> Path:
    """Files written by `write` into a temporary folder beside `target`, then moved into it: into a
    new or empty folder in one rename; into an earlier folder of the tool's file by file (`last`
    moved last, so a crash leaves no folder that looks complete), replacing only what its manifest
    lists and leaving every other file as it was. Refused, before anything moves, where a file of
    the same name that the tool did not write is there."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=target.parent))
    try:
        os.chmod(staging, 0o755)
        write(staging)
        written = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        if not target.exists() or (target.is_dir() and not any(target.iterdir())):
            record(staging, kind, written)
            os.replace(staging, target)
            return target
        previous = manifest_of(target) or _empty(kind)
        owned = set(previous["files"])
        for name in written:
            if (target / name).exists() and (name not in owned or (target / name).is_dir()):
                raise UsageError(f"{target} already holds {name}, which hsplitlora did not write (no manifest lists "
                                 "it); move it away or choose another folder.")  # fmt: skip
        record(target, kind, written)
        for name in sorted(written, key=lambda n: n == last):
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / name, target / name)
        stale = [name for name in owned - set(written) if _inside(target, name) is not None]
        for name in stale:
            if (target / name).is_file():
                (target / name).unlink()
        forget(target, stale)
        return target
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # the temporary folder this call made
