"""Issue 16: no silent clobbering, damaged files named in one sentence, settings that are applied
or refused (never ignored), and a run that stops on a non-finite update."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hsplitlora.cli import main

TINY = ("--model", "tiny", "--budgets", "5MB", "--clients", "2", "--steps", "1", "--val-size", "8")


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, byte for byte."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_sentence(err: str, *parts: str) -> None:
    """One error line, no traceback (progress and notes may come before it)."""
    assert "Traceback" not in err
    (line,) = [line for line in err.strip().splitlines() if ": error: " in line]
    for part in parts:
        assert part in line, (part, line)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A 2-round tiny run (its checkpoint holds round 2)."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    assert run_cli("run", *TINY, "--rounds", "2", "--output-dir", str(folder)) == 0
    return folder


@pytest.fixture
def copy_of(finished_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(finished_run, target)
    return target


def test_a_run_into_a_folder_holding_a_run_is_refused_and_leaves_it_unchanged(copy_of, capsys):
    before = snapshot(copy_of)
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(copy_of)) == 2
    one_sentence(capsys.readouterr().err, f"{copy_of} already holds a run", "--overwrite", f"--resume {copy_of}")
    assert snapshot(copy_of) == before


def test_overwrite_replaces_the_earlier_run(copy_of):
    (copy_of / "notes.txt").write_text("mine")  # not a run's file: kept
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(copy_of), "--overwrite") == 0
    metrics = [json.loads(line) for line in (copy_of / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1]
    assert json.loads((copy_of / "summary.json").read_text())["rounds"] == 1
    assert (copy_of / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("under", [False, True])
def test_an_output_path_that_is_or_lies_under_a_file_is_refused(tmp_path, capsys, under):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    target = blocker / "run" if under else blocker
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(target)) == 2
    one_sentence(capsys.readouterr().err, "lies under" if under else "is a file")
    assert blocker.read_text() == "x"


def test_compare_checks_every_strategy_before_training_and_hides_run_only_flags(tmp_path, capsys):
    out = tmp_path / "cmp"
    code = run_cli(
        "compare", "--strategies", "hsplitlora,fedlora", *TINY, "--split-mode", "u", "--output-dir", str(out)
    )
    assert code == 2
    one_sentence(capsys.readouterr().err, "fedlora")
    assert not out.exists()  # hsplitlora was not trained first
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    usage = capsys.readouterr().out
    assert "--strategies" in usage and "--resume" not in usage and "--strategy " not in usage


def test_compare_into_an_earlier_comparison_is_refused(tmp_path, capsys):
    out = tmp_path / "cmp"
    out.mkdir()
    (out / "comparison.json").write_text("{}")
    assert run_cli("compare", "--strategies", "splitlora", *TINY, "--rounds", "1", "--output-dir", str(out)) == 2
    one_sentence(capsys.readouterr().err, "already holds a comparison")
    assert (out / "comparison.json").read_text() == "{}"


def test_eval_refuses_to_replace_an_earlier_evaluation_and_writes_elsewhere(copy_of, tmp_path, capsys):
    (copy_of / "eval.json").write_text('{"mine": 1}')
    assert run_cli("eval", str(copy_of), "--limit", "2", "--beams", "1", "--max-new-tokens", "4") == 2
    one_sentence(capsys.readouterr().err, "already holds an evaluation", "--output")
    assert (copy_of / "eval.json").read_text() == '{"mine": 1}'
    from hsplitlora.data.e2e import default_data_dir

    elsewhere = tmp_path / "elsewhere"
    args = ("--limit", "2", "--beams", "1", "--max-new-tokens", "4", "--output", str(elsewhere))
    assert run_cli("eval", str(copy_of), *args, "--data-dir", str(default_data_dir())) == 0
    assert json.loads((elsewhere / "eval.json").read_text())["mrs"] == 2
    assert (copy_of / "eval.json").read_text() == '{"mine": 1}'


def test_export_refuses_a_non_empty_folder_unless_overwrite_and_never_a_run(copy_of, tmp_path, capsys):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert run_cli("export", str(copy_of), "--merged", str(out)) == 2
    one_sentence(capsys.readouterr().err, "not empty", "--overwrite")
    # --overwrite replaces only an earlier export (issue 26: it used to delete old.txt with the folder).
    assert run_cli("export", str(copy_of), "--merged", str(out), "--overwrite") == 2
    one_sentence(capsys.readouterr().err, "no earlier export")
    (out / "old.txt").unlink()
    assert run_cli("export", str(copy_of), "--merged", str(out)) == 0
    (out / "old.txt").write_text("old")
    assert run_cli("export", str(copy_of), "--merged", str(out), "--overwrite") == 0
    assert (out / "config.json").is_file() and (out / "old.txt").read_text() == "old"
    before = snapshot(copy_of)
    assert run_cli("export", str(copy_of), "--merged", str(copy_of), "--overwrite") == 2
    one_sentence(capsys.readouterr().err, "holds a run")
    assert snapshot(copy_of) == before
    assert run_cli("export", str(copy_of), "--adapter", str(tmp_path / "adapter"), "--rank", "100000") == 2
    one_sentence(capsys.readouterr().err, "rank 100000 exceeds")


@pytest.mark.parametrize(
    "damage, where, message",
    [
        ("garble", "checkpoint/state.json", "is not valid JSON"),
        ("empty", "checkpoint/state.json", "is empty"),
        ("truncate", "checkpoint/weights.safetensors", "is not a readable safetensors file"),
        ("remove", "checkpoint/weights.safetensors", "does not exist"),
        ("garble", "config.json", "is not valid JSON"),
        ("unknown key", "config.json", "does not know"),
    ],
)
def test_a_damaged_run_folder_is_named_in_one_sentence_and_left_unchanged(copy_of, capsys, damage, where, message):
    path = copy_of / where
    if damage == "garble":
        path.write_text(path.read_text()[:-7] + "}}garbled")
    elif damage == "empty":
        path.write_text("")
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:200])
    elif damage == "remove":
        path.unlink()
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "warp_drive": True}))
    before = snapshot(copy_of)
    assert run_cli("run", "--resume", str(copy_of), "--rounds", "3") == 2
    one_sentence(capsys.readouterr().err, message)
    assert snapshot(copy_of) == before


def test_a_config_edited_since_the_run_is_refused_on_resume(copy_of, capsys):
    config = json.loads((copy_of / "config.json").read_text())
    (copy_of / "config.json").write_text(json.dumps({**config, "clients": 1, "budgets": "5MB"}))
    before = snapshot(copy_of)
    assert run_cli("run", "--resume", str(copy_of), "--rounds", "3") == 2
    one_sentence(capsys.readouterr().err, "does not fit the run's config.json")
    assert snapshot(copy_of) == before


@pytest.mark.parametrize("change", [{"split_point": "deep"}, {"ranks": ["q_proj"]}, {"client_id": 0}, {"cut": 1}])
def test_a_damaged_plan_of_a_client_that_was_out_is_one_sentence(copy_of, capsys, change):
    # A checkpoint written while a client was out keeps the plan its adapters were shaped by.
    path = copy_of / "checkpoint" / "state.json"
    state = json.loads(path.read_text())
    plan = {"client_id": 1, "round": 2, "split_point": 1, "ranks": {}, "tail_blocks": None, "adapters": "anchor",
            "full_finetune_lr": None, "recompute": False}  # fmt: skip
    state["clients"][1]["plan"] = {**plan, **change}
    path.write_text(json.dumps(state))
    before = snapshot(copy_of)
    assert run_cli("run", "--resume", str(copy_of), "--rounds", "3") == 2
    one_sentence(capsys.readouterr().err, "does not fit the run's config.json")
    assert snapshot(copy_of) == before


def test_damaged_files_for_eval_are_named(copy_of, capsys):
    (copy_of / "model.safetensors").write_bytes(b"\x00" * 10)
    assert run_cli("eval", str(copy_of), "--limit", "1", "--overwrite") == 2
    one_sentence(capsys.readouterr().err, "model.safetensors", "truncated or damaged")


def test_resume_extends_and_the_extension_sticks_and_a_smaller_target_is_refused(copy_of, capsys):
    from hsplitlora.rounds import Reporter, resume_config, run

    assert run_cli("run", "--resume", str(copy_of)) == 2  # finished all 2 of its rounds
    one_sentence(capsys.readouterr().err, "finished all 2 of its rounds", "--rounds")
    assert run_cli("run", "--resume", str(copy_of), "--rounds", "1") == 2
    one_sentence(capsys.readouterr().err, "has finished 2 rounds", "above 2")

    class StopAfterRound3(Reporter):
        def round_finished(self, line):
            if line["round"] == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(resume_config(copy_of, 4), reporter=StopAfterRound3(), resume=True)
    assert json.loads((copy_of / "config.json").read_text())["rounds"] == 4
    assert run_cli("run", "--resume", str(copy_of)) == 0  # goes on to round 4
    metrics = [json.loads(line) for line in (copy_of / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3, 4]
    assert json.loads((copy_of / "summary.json").read_text())["rounds"] == 4


def test_a_non_finite_update_stops_the_run_with_valid_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--rounds", "2", "--alpha", "1e30", "--output-dir", str(out)) == 2
    one_sentence(capsys.readouterr().err, "the run stopped")
    assert not (out / "summary.json").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl"))


def test_examples_cut_before_their_response_are_left_out_and_counted(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--rounds", "1", "--max-seq-len", "60", "--output-dir", str(out)) == 0
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "training examples keep no response token within max_seq_len 60; they are left out" in err
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert line["train_loss"] > 1.0  # no example with nothing to learn counts as loss 0


def test_a_fixed_rank_without_a_cut_is_applied_at_the_planned_cuts(tmp_path):
    out = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--budgets", "5MB,8MB,20MB", "--clients", "3", "--rank", "2",
                   "--rounds", "1", "--steps", "1", "--val-size", "8", "--output-dir", str(out)) == 0  # fmt: skip
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for client in line["clients"]:  # 4 matrices per block, rank 2 on each
        assert client["client_rank_total"] == client["split_point"] * 4 * 2
        assert client["server_rank_total"] == (4 - client["split_point"]) * 4 * 2


def test_a_fixed_plan_over_budget_is_said_aloud(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--rounds", "1", "--split-point", "3", "--rank", "16", "--budgets", "1.2MB",
                   "--output-dir", str(out)) == 0  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert "warning: the fixed plan needs 14.43 MB on client 0, above its budget of 1.2 MB" in err


def test_the_paper_rule_s_plan_over_the_main_server_s_share_is_said_aloud(tmp_path, capsys):
    # The paper's SplitLoRA sees only the weakest client's budget; 4 MB for two clients is 2 MB each.
    out = tmp_path / "run"
    assert run_cli("run", *TINY, "--rounds", "1", "--budgets", "5MB,20MB", "--strategy", "splitlora-paper",
                   "--server-budget", "4MB", "--output-dir", str(out)) == 0  # fmt: skip
    err = " ".join(capsys.readouterr().err.split())
    assert ("warning: the plan needs up to 16.47 MB on the main server for client(s) 0, 1, above the share of 2 MB "
            "each") in err  # fmt: skip
    (line,) = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [c["server_predicted_bytes"] for c in line["clients"]] == [16_474_020] * 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "fedlora", "--split-point", "2"], "runs it whole on every client"),
        (["--strategy", "splitlora", "--rank", "2,4"], "they need one rank"),
        (["--strategy", "ft", "--rank", "2"], "trains every weight"),
        (["--rank", "100000"], "rank 100000 exceeds"),
    ],
)
def test_fixed_settings_that_cannot_apply_are_refused(tmp_path, capsys, args, message):
    assert run_cli("run", *TINY, "--rounds", "1", "--output-dir", str(tmp_path / "run"), *args) == 2
    one_sentence(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


def test_plan_levels_beyond_the_matrices_are_refused(capsys):
    assert run_cli("plan", "--model", "tiny", "--budgets", "5MB", "--levels", "0,100000", "--uniform-importance") == 2
    one_sentence(capsys.readouterr().err, "rank_levels 100000 exceeds")


def test_a_relative_data_dir_is_stored_resolved(tmp_path, monkeypatch):
    from hsplitlora.data.e2e import default_data_dir

    data = tmp_path / "data"
    shutil.copytree(default_data_dir(), data)
    monkeypatch.chdir(tmp_path)
    assert run_cli("run", *TINY, "--rounds", "1", "--data-dir", "data", "--output-dir", "run") == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data_dir"] == str(data.resolve())


def test_score_takes_an_empty_output_line(tmp_path, capsys):
    refs = tmp_path / "refs.txt"
    refs.write_text("the eagle is a pub\n\nthe mill is a cafe\n\nanother place\n")
    hyp = tmp_path / "hyp.txt"
    hyp.write_text("the eagle is a pub\n\n")  # the last two outputs: empty and empty
    assert run_cli("score", str(refs), str(hyp), "--json") == 2  # 2 outputs for 3 instances
    hyp.write_text("the eagle is a pub\n\nthe mill\n")  # an empty output in the middle
    assert run_cli("score", str(refs), str(hyp), "--json") == 0
    assert 0 < json.loads(capsys.readouterr().out)["BLEU"] < 1


@pytest.mark.parametrize(
    "content, message",
    [
        (b"mr,ref\nname[The Eagle],caf\xe9 by the river\n", "is not UTF-8 text"),
        (b"mr,ref\nname[The Eagle]\n", "line 2: the row has no 'ref' value"),
    ],
)
def test_bad_csv_data_is_named_in_one_sentence(tmp_path, capsys, content, message):
    (tmp_path / "devset.csv").write_bytes(content)
    assert run_cli("run", *TINY, "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "run")) == 2
    one_sentence(capsys.readouterr().err, message)
    assert not (tmp_path / "run").exists()


# -- issue 16 item 6: model folders, positions, memory, and fuzzed files ----------------------------------
@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    from hsplitlora.models.loading import byte_tokenizer, tiny_llama

    folder = tmp_path_factory.mktemp("models") / "good"
    tiny_llama().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        ("no weights", "holds no .safetensors weights"),
        ("config not json", "config.json is not valid JSON"),
        ("unknown architecture", "holds a model of type 'bert', which is not supported"),
        ("no tokenizer", "has no tokenizer"),
        ("truncated weights", "not a readable safetensors file"),
        ("garbled weights", "not a readable safetensors file"),
    ],
)
def test_a_model_folder_that_cannot_load_is_one_sentence(model_folder, tmp_path, capsys, damage, message):
    folder = tmp_path / "model"
    shutil.copytree(model_folder, folder)
    weights = folder / "model.safetensors"
    if damage == "no weights":
        weights.unlink()
    elif damage == "config not json":
        (folder / "config.json").write_text("{not json")
    elif damage == "unknown architecture":
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
    elif damage == "no tokenizer":
        for path in folder.iterdir():
            if "token" in path.name:
                path.unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:5000])
    else:
        weights.write_bytes(b"garbage" * 100)
    out = tmp_path / "run"
    assert run_cli("run", "--model", str(folder), "--clients", "2", "--budgets", "5MB", "--output-dir", str(out)) == 2
    one_sentence(capsys.readouterr().err, message)
    assert not out.exists()


def test_a_gpt2_sequence_beyond_its_positions_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run_cli("run", "--model", "tiny-gpt2", "--max-seq-len", "2000", "--output-dir", str(out)) == 2
    one_sentence(capsys.readouterr().err, "max_seq_len 2000 exceeds the 512 positions this model learned")


def test_memory_the_machine_cannot_hold_is_refused_before_training(tmp_path, capsys, monkeypatch, copy_of):
    import hsplitlora.resources

    monkeypatch.setattr(hsplitlora.resources, "available_memory", lambda: 10 * 2**20)
    out = tmp_path / "new"
    assert run_cli("run", *TINY, "--batch-size", "64", "--budgets", "1GB", "--output-dir", str(out)) == 2
    one_sentence(capsys.readouterr().err, "simulating every client in this process needs about",
                 "but this machine has 10.49 MB available", "lower batch_size")  # fmt: skip
    assert not (out / "metrics.jsonl").exists()
    assert run_cli("eval", str(copy_of), "--beams", "64", "--batch-size", "64") == 2
    one_sentence(capsys.readouterr().err, "beam search with 64 beams over batches of 64 needs about")
    assert not (copy_of / "eval.json").exists()


FILES = ["config.json", "metrics.jsonl", "checkpoint/state.json", "checkpoint/weights.safetensors"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(target=st.sampled_from(FILES), cut=st.floats(0, 1), noise=st.binary(max_size=40), command=st.sampled_from(
    ["resume", "eval", "export"]))  # fmt: skip
def test_fuzzed_run_files_give_a_sentence_or_work_never_a_traceback(finished_run, tmp_path_factory, target, cut, noise,
                                                                     command):  # fmt: skip
    folder = tmp_path_factory.mktemp("fuzz") / "run"
    shutil.copytree(finished_run, folder)
    path = folder / target
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)] + noise)
    args = {"resume": ["run", "--resume", str(folder), "--rounds", "3"],
            "eval": ["eval", str(folder), "--limit", "1", "--beams", "1", "--max-new-tokens", "2"],
            "export": ["export", str(folder), "--merged", str(folder.parent / "merged")]}[command]  # fmt: skip
    assert run_cli(*args) in (0, 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       suffix=st.sampled_from([".jsonl", ".json", ".csv", ".parquet"]))  # fmt: skip
def test_fuzzed_data_files_give_a_sentence_never_a_traceback(tmp_path_factory, content, suffix):
    folder = tmp_path_factory.mktemp("data")
    path = folder / f"data{suffix}"
    path.write_bytes(content)
    out = folder / "run"
    assert run_cli("run", *TINY, "--rounds", "1", "--data", str(path), "--output-dir", str(out)) in (0, 2)
    e2e = folder / "e2e"
    e2e.mkdir()
    (e2e / "devset.csv").write_bytes(content)
    assert run_cli("run", *TINY, "--rounds", "1", "--data-dir", str(e2e), "--output-dir", str(folder / "run2")) in (
        0,
        2,
    )


def test_a_damaged_checkpoint_offers_an_earlier_complete_one(copy_of, capsys):
    shutil.copytree(copy_of / "checkpoint", copy_of / ".checkpoint-old")  # as a crash between renames leaves it
    (copy_of / "checkpoint" / "state.json").write_text("{garbled")
    before = snapshot(copy_of)
    assert run_cli("run", "--resume", str(copy_of), "--rounds", "3") == 2
    one_sentence(
        capsys.readouterr().err, "is not valid JSON", f"an earlier complete checkpoint is in {copy_of}/.checkpoint-old"
    )
    assert snapshot(copy_of) == before
