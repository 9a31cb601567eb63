"""No setting accepted and then ignored, refusals that name the right cause, and runs that notice
when their data files changed (issue 26)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hsplitlora.cli import main
from hsplitlora.config import load_config
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
