"""No setting accepted and then ignored, refusals that name the right cause, and runs that notice
when their data files changed (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsplitlora.checks import load_config
from hsplitlora.cli import main
from hsplitlora.errors import UsageError


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:
        return exit_.code


def one_sentence(err: str, *parts: str) -> None:
    text = " ".join(err.split())
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for part in parts:
        assert part in text, text


@pytest.fixture
def records(tmp_path):
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": f"answer {i}", "topic": i % 2}) + "\n"
                            for i in range(30)))  # fmt: skip
    return path


# -- a setting that has no effect with the others given is refused, saying why ---------------------------
@pytest.mark.parametrize(
    "settings, message",
    [
        ({"val_data": "val.jsonl"}, "E2E training validates on E2E's testset_w_refs.csv"),
        ({"dirichlet_alpha": 0.3}, "dirichlet_alpha shapes a Dirichlet partition, and partition is iid"),
        ({"dirichlet_alpha": 0.5}, "dirichlet_alpha shapes a Dirichlet partition"),  # the default, but given
        ({"tail_blocks": 1}, "tail_blocks 1 sets the blocks a client keeps in a U-shaped split"),
        ({"ray_address": "10.0.0.1:6379"}, "ray_address configures the Ray engine, and engine is inprocess"),
        ({"ray_client_resources": {"num_cpus": 1}}, "ray_client_resources configures the Ray engine"),
        ({"strategy": "splitlora", "adapter_lifecycle": "recreate"}, "splitlora has a fixed life cycle of its own"),
        ({"strategy": "fedlora", "adapter_lifecycle": "persist"}, "choose one of hsplitlora, no-iwi"),
        ({"device_preset": "nosuch", "budgets": "5MB"}, "device preset 'nosuch' is unknown"),
        ({"device_preset": "homo5", "budgets": "5MB"}, "budgets replaces them"),
        ({"rank": 0}, "rank 0 gives no client an adapter, so nothing would be trained"),
        ({"rank": [0, 0], "clients": 2}, "gives no client an adapter"),
        ({"rank_levels": [0]}, "rank_levels [0] hold no positive rank"),
        ({"strategy": "ft", "lora_scaling": "rslora"}, "lora_scaling rslora sets the adapters' scale, and ft trains"),
        ({"lora_scaling": "sqrt"}, "lora_scaling 'sqrt' is unknown; choose standard or rslora"),
    ],
)
def test_a_setting_that_would_be_ignored_is_refused_with_the_reason(settings, message):
    with pytest.raises(UsageError, match="^") as caught:
        load_config(None, {"model": "tiny", **settings})
    assert message in str(caught.value)


def test_own_data_settings_that_would_be_ignored_are_refused(records):
    own = {"model": "tiny", "data": str(records)}
    with pytest.raises(UsageError, match="data_dir is E2E's folder, and this run reads your own data"):
        load_config(None, {**own, "data_dir": "somewhere"})
    with pytest.raises(UsageError, match="partition_field groups records for partition dirichlet, and partition"):
        load_config(None, {**own, "partition_field": "topic"})
    folder = records.parent / "clients"
    folder.mkdir()
    for name in ("a", "b"):
        (folder / f"{name}.jsonl").write_text(records.read_text())
    with pytest.raises(UsageError, match="client_data gives each client its own file, so dirichlet_alpha"):
        load_config(None, {"model": "tiny", "client_data": str(folder), "dirichlet_alpha": 0.2})


def test_the_same_settings_where_they_take_effect_are_accepted(records):
    assert load_config(None, {"model": "tiny", "split_mode": "u", "tail_blocks": 2}).tail == 2
    assert load_config(None, {"model": "tiny", "partition": "dirichlet", "dirichlet_alpha": 0.3}).dirichlet_alpha == 0.3
    assert load_config(None, {"model": "tiny", "adapter_lifecycle": "recreate", "strategy": "no-naa"})
    assert load_config(None, {"model": "tiny", "engine": "ray", "ray_address": "10.0.0.1:6379"})
    assert load_config(None, {"model": "tiny", "strategy": "ft", "rank_levels": [0]})  # full fine-tuning
    assert load_config(None, {"model": "tiny", "clients": 2, "rank": [0, 4]}).rank == [0, 4]  # one client trains
    assert load_config(None, {"model": "tiny", "data": str(records), "val_data": str(records)})


def test_a_config_file_that_sets_one_setting_twice_is_refused_naming_both(tmp_path):
    path = tmp_path / "run.yaml"
    for text, message in [
        ("steps: 2\nlocal_steps: 3\n", "sets local_steps twice, as 'steps' and 'local_steps'"),
        ("split-point: 2\nsplit_point: 3\n", "sets split_point twice, as 'split-point' and 'split_point'"),
        ("rounds: 2\nrounds: 3\n", "sets 'rounds' twice"),
    ]:
        path.write_text("model: tiny\n" + text)
        with pytest.raises(UsageError, match="^") as caught:
            load_config(path)
        assert message in str(caught.value)


def test_a_flag_wins_over_the_file_whichever_alias_either_uses(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\nsteps: 4\n")
    assert load_config(path).local_steps == 4
    assert load_config(path, {"local_steps": 2}).local_steps == 2  # --steps and --local-steps share a dest


def test_relative_paths_in_a_config_file_are_taken_from_its_folder(tmp_path, records, monkeypatch):
    (tmp_path / "conf").mkdir()
    path = tmp_path / "conf" / "run.yaml"
    path.write_text("model: tiny\ndata: ../own.jsonl\noutput_dir: runs/one\n")
    monkeypatch.chdir("/")  # any other working directory
    config = load_config(path)
    assert Path(config.data).resolve() == records.resolve()
    assert Path(config.output_dir).resolve() == (tmp_path / "conf" / "runs" / "one").resolve()
    monkeypatch.chdir(tmp_path)
    assert load_config(path, {"data": "own.jsonl"}).data == "own.jsonl"  # a flag is taken from the working directory


# -- refusals name the right cause (and what to do); what works is not refused -----------------------------
def test_csv_fields_are_text_as_written_with_a_bom_and_crlf_line_ends(tmp_path):
    from hsplitlora.data.records import Fields, read_rows, to_records

    path = tmp_path / "numbers.csv"
    path.write_bytes(b'\xef\xbb\xbfprompt,response\r\nWhat is 6 x 7?,42\r\n"Say ""hi""",007\r\n')
    records = to_records(read_rows(path), path, Fields(), "<eos>")
    assert [r.reference for r in records] == ["42", "007"]  # text, leading zero kept
    assert records[1].pieces[0][0] == 'Say "hi"'


def test_a_save_to_disk_dataset_dict_reads_its_train_split(tmp_path):
    import datasets

    from hsplitlora.data.records import read_rows

    splits = {"train": {"prompt": ["a", "b"], "response": ["1", "2"]}, "test": {"prompt": ["c"], "response": ["3"]}}
    datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(tmp_path / "dd")
    assert read_rows(tmp_path / "dd") == [{"prompt": "a", "response": "1"}, {"prompt": "b", "response": "2"}]


@pytest.mark.parametrize(
    "make, args, message",
    [
        (lambda d: (d / "h.csv").write_text("prompt,response\n"), ["--data", "h.csv"],
         "h.csv holds a header line but no records"),
        (lambda d: (d / "one.jsonl").write_text('{"prompt": "a", "response": "b"}\n'),
         ["--data", "one.jsonl", "--clients", "1"], "1 of them are held out for validation (no --val-data given)"),
        (None, ["--data", "own.jsonl", "--clients", "2", "--max-seq-len", "1"],
         "max_seq_len 1 leaves no response token to learn in any record"),
        (None, ["--max-seq-len", "1"], "max_seq_len 1 cuts every training example before its response starts"),
        (None, ["--strategy", "cenlora", "--clients", "3", "--rank", "2,4,8"],
         "cenlora is a centralised reference: one trainer on the pooled data, with one rank"),
        (None, ["--alpha", "-inf"], "alpha must be a finite number, got -inf"),
        (None, ["--budgets", "-5MB"], "budget '-5MB' is not a memory size"),
        (None, ["--lr", "-1e-3"], "lr must be a positive number, got -0.001"),
        (None, ["--budgets", "5Mb"], "budget '5Mb' is in bits (a lowercase b means bits)"),
        (lambda d: (d / "conf").mkdir(), ["--config", "conf"], "config file conf is a folder"),
    ],
)  # fmt: skip
def test_a_refusal_names_the_right_cause_and_leaves_no_files(tmp_path, records, capsys, monkeypatch, make, args,
                                                             message):  # fmt: skip
    monkeypatch.chdir(tmp_path)
    if make:
        make(tmp_path)
    assert run_cli("run", "--model", "tiny", "--budgets", "5MB", "--output-dir", "out", *args) == 2
    one_sentence(capsys.readouterr().err, message)
    assert not (tmp_path / "out").exists()  # nothing that would block the corrected rerun


def test_negative_looking_values_reach_our_validation_in_plan_too(capsys):
    assert run_cli("plan", "--model", "tiny", "--budgets", "5MB", "--levels", "-2,0,4", "--uniform-importance") == 2
    err = capsys.readouterr().err
    assert "expected one argument" not in err and "[-2, 0, 4]" in err


def test_sizes_are_bytes_read_and_printed_in_the_units_people_write():
    from hsplitlora.units import format_bytes, parse_bytes

    assert format_bytes(parse_bytes("10GB")) == "10 GB" and format_bytes(parse_bytes("1.5GB")) == "1.5 GB"
    assert format_bytes(parse_bytes("300MB")) == "300 MB" and parse_bytes("2GiB") == 2 * 2**30
    for bits in ("5Mb", "5mb", "1gib"):
        with pytest.raises(UsageError, match="in bits"):
            parse_bytes(bits)


# -- resume and eval check the data files the run started with ---------------------------------------------
def test_an_e2e_run_records_both_of_its_files():
    from hsplitlora.data.fingerprint import data_paths

    assert [p.name for p in data_paths(load_config(None, {"model": "tiny"}))] == ["devset.csv", "testset_w_refs.csv"]


def test_resume_and_eval_refuse_naming_a_data_file_that_changed(tmp_path, records, capsys):
    folder = tmp_path / "clients"
    folder.mkdir()
    lines = records.read_text().splitlines(keepends=True)
    (folder / "a.jsonl").write_text("".join(lines[:12]))
    (folder / "b.jsonl").write_text("".join(lines[12:24]))
    out = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--client-data", str(folder), "--budgets", "5MB", "--rounds", "1",
                   "--steps", "1", "--val-size", "4", "--output-dir", str(out)) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "one file per client, samples per client" in err and "iid partition" not in err
    recorded = json.loads((out / "config.json").read_text())["resolved"]["data_files"]
    assert sorted(Path(name).name for name in recorded) == ["a.jsonl", "b.jsonl"]
    assert all(len(entry["sha256"]) == 64 and entry["bytes"] > 0 for entry in recorded.values())

    assert run_cli("eval", str(out), "--data-dir", str(tmp_path), "--limit", "1") == 2
    one_sentence(capsys.readouterr().err, "--data-dir names E2E's test set", "drop --data-dir")

    original = (folder / "b.jsonl").read_text()
    (folder / "b.jsonl").write_text(original.replace("answer 13", "answer 99"))  # same size, other data
    assert run_cli("run", "--resume", str(out), "--rounds", "2") == 2
    one_sentence(capsys.readouterr().err, f"data file {(folder / 'b.jsonl').resolve()} changed since the run started")
    assert run_cli("eval", str(out), "--limit", "1", "--beams", "1") == 2
    one_sentence(capsys.readouterr().err, f"data file {(folder / 'b.jsonl').resolve()} changed", "evaluate")
    assert not (out / "eval.json").exists() and json.loads((out / "config.json").read_text())["rounds"] == 1

    (folder / "b.jsonl").write_text(original)  # restored: both go on
    assert run_cli("eval", str(out), "--limit", "1", "--beams", "1", "--max-new-tokens", "4") == 0
    assert run_cli("run", "--resume", str(out), "--rounds", "2") == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
