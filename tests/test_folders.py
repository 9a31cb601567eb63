"""Issue 26, data loss: the tool deletes only what it wrote. Every folder it writes carries a
manifest; --overwrite removes only the files listed there; no output folder lies inside a run's or
an export's folder, and no run or export folder holds another run. Each case checks that a user's
files survive byte for byte."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsplitlora import folders
from hsplitlora.errors import UsageError
from hsplitlora.reporting import RunFolder, check_run_folder
from tests.test_trust import TINY, one_sentence, run_cli

# A committed study run written before run folders had a manifest (the exact update's, regime i).
STUDY_RUN = Path(__file__).parents[1] / "docs" / "results" / "runs" / "i" / "hsplitlora-exact" / "seed0"
QUICK_EVAL = ("--limit", "1", "--beams", "1", "--max-new-tokens", "2")


def hashes(folder: Path) -> dict[str, str]:
    """Every file under `folder` (the manifest aside) by its SHA-256."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != folders.MANIFEST}  # fmt: skip


def plant(folder: Path) -> dict[str, str]:
    """A user's files: at the top, in a nested folder and inside checkpoint/; returns their hashes."""
    files = {"notes.txt": b"mine", "data/deep/train.jsonl": b'{"prompt": "a", "response": "b"}\n',
             "checkpoint/my-notes.md": b"# kept"}  # fmt: skip
    for name, content in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(content)
    return {name: hashlib.sha256(content).hexdigest() for name, content in files.items()}


def kept(folder: Path, planted: dict[str, str]) -> bool:
    now = hashes(folder)
    return all(now.get(name) == digest for name, digest in planted.items())


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(folder)) == 0
    return folder


@pytest.fixture(scope="module")
def exported(finished_run, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("exported") / "merged"
    assert run_cli("export", str(finished_run), "--merged", str(folder)) == 0
    return folder


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


def test_a_run_lists_exactly_the_files_it_wrote(finished_run):
    manifest = folders.read_manifest(finished_run)
    assert manifest["kind"] == "run"
    written = set(hashes(finished_run))
    assert written <= set(manifest["files"])
    assert {"config.json", "metrics.jsonl", "model.safetensors", "checkpoint/weights.safetensors"} <= written


def test_run_overwrite_removes_only_the_runs_files(run_copy):
    planted = plant(run_copy)
    old_weights = (run_copy / "model.safetensors").read_bytes()
    assert run_cli("run", *TINY, "--rounds", "1", "--seed", "3", "--output-dir", str(run_copy), "--overwrite") == 0
    assert kept(run_copy, planted)
    assert (run_copy / "model.safetensors").read_bytes() != old_weights  # seed 3 trained anew
    assert set(hashes(run_copy)) - set(planted) <= set(folders.read_manifest(run_copy)["files"])


def test_a_folder_holding_config_json_is_not_a_run(exported, tmp_path, capsys):
    """An exported model folder, or a user's folder with a config.json and a checkpoint/: never a run."""
    model = Path(shutil.copytree(exported, tmp_path / "model"))
    (model / folders.MANIFEST).unlink()  # as a user's own Hugging Face folder
    user = tmp_path / "user"
    for name in ("config.json", "model.safetensors", "checkpoint/x.bin"):
        (user / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_bytes(b"user " + name.encode())
    for folder in (model, user):
        before = hashes(folder)
        assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(folder), "--overwrite") == 2
        one_sentence(capsys.readouterr().err, str(folder), "config.json", "did not write")
        assert hashes(folder) == before
        assert run_cli("run", "--resume", str(folder)) == 2
        one_sentence(capsys.readouterr().err, f"cannot resume {folder}")
        assert hashes(folder) == before
    assert folders.kind_of(user) is None and folders.kind_of(model) is None


def test_export_overwrite_replaces_only_the_earlier_export(finished_run, tmp_path, capsys):
    out = tmp_path / "merged"
    assert run_cli("export", str(finished_run), "--merged", str(out)) == 0
    planted = plant(out)
    assert run_cli("export", str(finished_run), "--merged", str(out), "--overwrite") == 0
    assert kept(out, planted) and (out / "config.json").is_file()
    # An adapter replaces the merged model's files (stale ones go), never the user's.
    assert run_cli("export", str(finished_run), "--adapter", str(out), "--rank", "2", "--overwrite") == 0
    assert kept(out, planted) and not (out / "model.safetensors").exists()
    assert (out / "adapter_config.json").is_file()
    # A folder no export wrote is refused even with --overwrite, and a user's README.md is never replaced.
    user = tmp_path / "user"
    user.mkdir()
    (user / "README.md").write_text("my readme")
    before = hashes(user)
    for target in ("--merged", "--adapter"):
        assert run_cli("export", str(finished_run), target, str(user), "--overwrite") == 2
        one_sentence(capsys.readouterr().err, str(user), "no earlier export")
    assert hashes(user) == before


def test_save_pretrained_never_removes_a_users_folder(exported, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hsplitlora.models.loading import save_pretrained_atomic

    model = AutoModelForCausalLM.from_pretrained(exported)
    tokenizer = AutoTokenizer.from_pretrained(exported)
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text("{}")
    planted = plant(target)
    before = hashes(target)
    with pytest.raises(UsageError, match="config.json, which hsplitlora did not write"):
        save_pretrained_atomic(model, tokenizer, target)
    assert hashes(target) == before
    (target / "config.json").unlink()
    save_pretrained_atomic(model, tokenizer, target)
    assert kept(target, planted)
    assert AutoModelForCausalLM.from_pretrained(target).config.num_hidden_layers == model.config.num_hidden_layers
    assert not list(tmp_path.glob(".staging-*"))


@pytest.mark.parametrize("inner", ["checkpoint/inner", "sub", "checkpoint"])
def test_no_output_folder_inside_a_run(run_copy, exported, tmp_path, capsys, inner):
    before = hashes(run_copy)
    target = run_copy / inner
    commands = [
        ["run", *TINY, "--rounds", "1", "--output-dir", str(target), "--overwrite"],
        ["export", str(run_copy), "--merged", str(target), "--overwrite"],
        ["eval", str(run_copy), *QUICK_EVAL, "--output", str(target), "--overwrite"],
        ["compare", "--strategies", "splitlora", *TINY, "--rounds", "1", "--output-dir", str(target), "--overwrite"],
    ]
    for command in commands:
        assert run_cli(*command) == 2, command
        one_sentence(capsys.readouterr().err, str(target), str(run_copy.resolve()), "inside")
    assert hashes(run_copy) == before
    exported_before = hashes(exported)
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(exported / "run")) == 2
    one_sentence(capsys.readouterr().err, str(exported.resolve()), "an export")
    assert hashes(exported) == exported_before


def test_no_run_or_export_folder_holds_a_run(run_copy, tmp_path, capsys):
    parent = run_copy.parent
    before = hashes(parent)
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(parent)) == 2
    one_sentence(capsys.readouterr().err, f"run folder {parent} holds the run folder {run_copy}")
    assert run_cli("export", str(run_copy), "--merged", str(parent), "--overwrite") == 2
    one_sentence(capsys.readouterr().err, str(parent), str(run_copy))
    assert hashes(parent) == before


def test_eval_and_compare_never_write_into_another_runs_folder(finished_run, run_copy, capsys):
    other = run_copy
    before = hashes(other)
    assert run_cli("eval", str(finished_run), *QUICK_EVAL, "--output", str(other), "--overwrite") == 2
    one_sentence(capsys.readouterr().err, str(other), str(finished_run), "another run")
    assert run_cli("compare", "--strategies", "splitlora", *TINY, "--rounds", "1", "--output-dir", str(other),
                   "--overwrite") == 2  # fmt: skip
    one_sentence(capsys.readouterr().err, str(other), "holds a run")
    assert hashes(other) == before


def test_eval_overwrite_into_its_own_run_replaces_only_its_files(run_copy, capsys):
    assert run_cli("eval", str(run_copy), *QUICK_EVAL) == 0
    planted = plant(run_copy)
    assert {"eval.json", "predictions.txt"} <= set(folders.read_manifest(run_copy)["files"])
    assert run_cli("eval", str(run_copy), *QUICK_EVAL, "--overwrite") == 0
    assert kept(run_copy, planted)


def test_compare_overwrite_with_fewer_strategies_removes_the_old_sub_runs(tmp_path):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    base = ("--rounds", "1", "--output-dir", str(out))
    assert run_cli("compare", "--strategies", "splitlora,fedlora", *TINY, *base) == 0
    (out / "fedlora" / "notes.txt").write_text("in a sub-run")
    assert run_cli("compare", "--strategies", "splitlora", *TINY, *base, "--overwrite") == 0
    rows = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["strategy"] for row in rows] == ["splitlora"]
    assert (out / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in (out / "fedlora").iterdir()) == ["notes.txt"]  # the user's file alone is left
    assert folders.read_manifest(out)["runs"] == ["splitlora"]


@pytest.mark.parametrize("command", [
    ["run", *TINY, "--rounds", "1", "--output-dir", ""],
    ["compare", "--strategies", "splitlora", *TINY, "--rounds", "1", "--output-dir", ""],
])  # fmt: skip
def test_an_empty_output_dir_is_refused(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run_cli(*command) == 2
    one_sentence(capsys.readouterr().err, "--output-dir is an empty path")
    assert not (tmp_path / "runs").exists()


def test_empty_eval_and_export_paths_are_refused(run_copy, capsys):
    before = hashes(run_copy)
    assert run_cli("eval", str(run_copy), *QUICK_EVAL, "--output", "") == 2
    one_sentence(capsys.readouterr().err, "--output is an empty path")
    assert run_cli("export", str(run_copy), "--merged", "", "--overwrite") == 2
    one_sentence(capsys.readouterr().err, "an empty path")
    assert hashes(run_copy) == before


def test_a_run_without_a_manifest_is_known_by_its_complete_set_of_files(tmp_path, capsys):
    """The study's committed runs (config, metrics, summary; no manifest) stay runs; half a set does not."""
    legacy = Path(shutil.copytree(STUDY_RUN, tmp_path / "legacy"))
    assert not (legacy / folders.MANIFEST).exists() and folders.kind_of(legacy) == "run"
    planted = plant(legacy)
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(legacy)) == 2
    one_sentence(capsys.readouterr().err, "already holds a run", "--overwrite")
    folders.clear(legacy)
    assert set(hashes(legacy)) == set(planted) and kept(legacy, planted)
    half = Path(shutil.copytree(STUDY_RUN, tmp_path / "half"))
    (half / "summary.json").unlink()
    assert folders.kind_of(half) is None
    with pytest.raises(UsageError, match="did not write"):
        check_run_folder(half, overwrite=True)


# -- fuzz: folders holding user files, nested folders, runs and exports --------------------------------

NAMES = st.sampled_from(["config.json", "metrics.jsonl", "model.safetensors", "checkpoint", "eval.json", "README.md",
                         "notes.txt", "plan.png", "tokenizer.json", "sub", "data"])  # fmt: skip
TREES = st.lists(st.tuples(st.lists(NAMES, min_size=1, max_size=3), st.binary(max_size=8),
                           st.sampled_from(["file", "run", "export"])), max_size=6)  # fmt: skip


def _build(root: Path, tree) -> None:
    """User files, and (at nested places) folders that the tool wrote: runs and exports."""
    for parts, content, what in tree:
        path = root.joinpath(*parts)
        if any(p.is_file() for p in [path, *path.parents] if p != root and root in p.parents):
            continue  # a file already sits where a folder would go
        if what == "file":
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
        elif not path.exists() and len(parts) > 1:
            path.mkdir(parents=True)
            (path / "config.json").write_bytes(content)
            folders.record(path, what, ["config.json"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=TREES, overwrite=st.booleans(), twice=st.booleans())
def test_fuzz_a_run_folder_keeps_every_file_it_did_not_write(tmp_path_factory, tree, overwrite, twice):
    root = tmp_path_factory.mktemp("fuzz") / "out"
    root.mkdir()
    _build(root, tree)
    before = hashes(root)
    try:
        check_run_folder(root, overwrite=overwrite)
    except UsageError:
        assert hashes(root) == before  # refused: nothing touched
        return
    for _ in range(2 if twice else 1):  # a run, then (--overwrite) another in its place
        folder = RunFolder(root)
        folder.clear()
        folder.write_config({"strategy": "splitlora", "model": "tiny", "rounds": 1})
        folder.rewrite_metrics([{"round": 1}])
        folder.save_checkpoint({"round": 1}, {"w": torch.zeros(2)})
        folder.save_checkpoint({"round": 2}, {"w": torch.ones(2)})
    now = hashes(root)
    assert all(now.get(name) == digest for name, digest in before.items())
    assert set(now) - set(before) <= set(folders.read_manifest(root)["files"])
    folders.clear(root)  # what --overwrite removes: the run's files, and nothing else
    assert hashes(root) == before


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tree=TREES, nested=st.lists(NAMES, max_size=2))
def test_fuzz_an_export_never_replaces_a_users_file(tmp_path_factory, tree, nested):
    root = tmp_path_factory.mktemp("fuzz") / "out"
    root.mkdir()
    _build(root, tree)
    target = root.joinpath(*nested)
    before = hashes(root)

    def write(staging: Path) -> None:
        (staging / "config.json").write_text('{"exported": true}')
        (staging / "model.safetensors").write_bytes(b"weights")

    try:
        from hsplitlora.evaluation.export import check_export_folder

        check_export_folder(tmp_path_factory.mktemp("elsewhere"), target, overwrite=True)
        folders.write_folder(target, "export", write)
    except UsageError:
        assert hashes(root) == before
        return
    now = hashes(root)
    written = {str((target / name).relative_to(root)) for name in ("config.json", "model.safetensors")}
    assert all(now[name] == digest for name, digest in before.items() if name not in written)
    assert (target / "config.json").read_text() == '{"exported": true}'
