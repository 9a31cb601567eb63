"""Fingerprints (size and SHA-256) of the data files a run reads, recorded in its config.json when
it starts, so that resume and eval refuse, naming the file, to go on with data that changed."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hsplitlora.data.e2e import FILES, data_file
from hsplitlora.data.records import data_files
from hsplitlora.errors import UsageError


def fingerprint(path: str | Path) -> dict:
    """{"bytes": size, "sha256": hex digest} of a file, or of a save_to_disk folder's files
    together (with their names)."""
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    digest, size = hashlib.sha256(), 0
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
                size += len(block)
    return {"bytes": size, "sha256": digest.hexdigest()}


def data_paths(config) -> list[Path]:
    """Every data file a run reads: E2E's two, or your data file (or client files) and val_data."""
    if config.client_data is not None:
        paths = data_files(config.client_data)
    elif config.data == "e2e":
        paths = [data_file(config.data_dir, "train"), data_file(config.data_dir, "test")]
    else:
        paths = [Path(config.data)]
    return paths + ([Path(config.val_data)] if config.val_data is not None else [])


def fingerprints(config) -> dict[str, dict]:
    """{absolute path: fingerprint} of every data file of the run, for config.json."""
    return {str(path.resolve()): fingerprint(path) for path in data_paths(config)}


def check_fingerprints(recorded, action: str, only_e2e_test: bool = False) -> None:
    """Refuse, naming the file, when a data file recorded at the run's start is gone or changed
    (`action`: what would go on, e.g. "resume"). Runs that recorded none are not checked."""
    if not isinstance(recorded, dict):
        return
    for name, expected in recorded.items():
        path = Path(name)
        if only_e2e_test and path.name != FILES["test"]:
            continue
        if not path.exists():
            raise UsageError(f"data file {name}, which the run read, no longer exists; restore it to {action}.")
        if fingerprint(path) != expected:
            raise UsageError(f"data file {name} changed since the run started (its size or SHA-256 differ), so "
                             f"the run would {action} on other data; restore the file or start a new run.")  # fmt: skip
