"""The committed Flower app (flower/pyproject.toml): its run config lists every RunConfig setting
with its default, as engines/flower_settings.py writes it, and `flwr run flower` runs it in
Flower's simulation runtime (the local SuperLink Flower starts, in a temporary FLWR_HOME)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
import typing
from contextlib import suppress
from pathlib import Path

import pytest

from hsplitlora.config import RunConfig
from hsplitlora.engines import flower_settings
from hsplitlora.engines.flower_local import free_port
from hsplitlora.errors import UsageError
from hsplitlora.rounds import run

pytest.importorskip("flwr")

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / flower_settings.COMMITTED_APP


def test_app_config_lists_every_setting_with_its_default():
    text = APP.read_text()
    assert text == flower_settings.app_pyproject(), (
        f"{flower_settings.COMMITTED_APP} differs from RunConfig; write it again with "
        f".venv/bin/python -m hsplitlora.engines.flower_settings {flower_settings.COMMITTED_APP}"
    )
    config = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    hints = typing.get_type_hints(RunConfig)
    for item in dataclasses.fields(RunConfig):
        key = item.name.replace("_", "-")
        assert key in config, f"{key} (RunConfig.{item.name}) is missing from the app's run config"
        expected = "flower" if item.name == "engine" else getattr(RunConfig(), item.name)
        assert flower_settings._read(item.name, config[key], hints[item.name]) == expected, key
    assert set(config) == {f.name.replace("_", "-") for f in dataclasses.fields(RunConfig)} | set(
        flower_settings.OPTIONS
    )
    assert flower_settings.settings(config) == (None, {})  # defaults are not "given"

    from flwr.common.config import flatten_dict, validate_config

    assert validate_config(tomllib.loads(text), check_module=False)[0]
    assert flatten_dict(config) == config  # only scalars: Flower takes it as it is

    given = {**config, "rounds": 3, "targets": "q,v", "rank-levels": "0,4", "split-point": "2", "dp-clip": 1.5,
             "devices": '{"0": {"budget": "1GB"}}', "config-file": "run.yaml"}  # fmt: skip
    path, settings = flower_settings.settings(given)
    assert path == "run.yaml"
    assert settings == {"rounds": 3, "targets": ["q", "v"], "rank_levels": [0, 4], "split_point": 2, "dp_clip": 1.5,
                        "devices": {"0": {"budget": "1GB"}}}  # fmt: skip
    with pytest.raises(UsageError, match="comma-separated integers"):
        flower_settings.settings({"rank-levels": "0,four"})
    with pytest.raises(UsageError, match="engine"):
        flower_settings.settings({"engine": "ray"})


def _ours(home: Path) -> list[int]:
    """The local SuperLink Flower started for FLWR_HOME `home`, and what it started (Flower's
    superexec names its parent with --parent-pid)."""
    table = subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,stat=,args="], capture_output=True, text=True).stdout
    rows = [(int(p[0]), int(p[1]), p[2], (p + [""])[3]) for p in (line.split(None, 3) for line in table.splitlines())]
    found = {pid for pid, _, _, args in rows if f"{home}/local-superlink" in args}
    while more := {pid for pid, ppid, _, args in rows if pid not in found
                   and (ppid in found or any(f"--parent-pid {p}" in args for p in found))}:  # fmt: skip
        found |= more
    return [pid for pid, _, stat, _ in rows if pid in found and not stat.startswith("Z")]


def test_flwr_run_in_the_simulation_runtime(tmp_path):
    home, run_dir = tmp_path / "flwr-home", tmp_path / "run"
    env = {**os.environ, "FLWR_HOME": str(home), "OMP_NUM_THREADS": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()), "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}  # fmt: skip
    settings = (f"model='tiny' clients=2 rounds=1 local-steps=1 budgets='5MB,20MB' val-size=4 batch-size=4 "
                f"split-rule='deepest' output-dir='{run_dir}'")  # fmt: skip
    command = [str(Path(sys.executable).parent / "flwr"), "run", str(APP.parent), "--run-config", settings,
               "--federation-config", "num-supernodes=2 client-resources-num-cpus=1 init-args-num-cpus=1",
               "--stream"]  # fmt: skip
    # A ServerApp that stopped after round 1 (its checkpoint saved), then resumed to round 2 with
    # resume=true: the run equals one that was never stopped.
    again = [*command[:4], f"resume=true rounds=2 output-dir='{run_dir}'", *command[5:]]
    try:
        done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        started = _ours(home)
        resumed = subprocess.run(again, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    finally:
        for pid in _ours(home):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        while _ours(home) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid in _ours(home):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert done.returncode == 0, (done.stdout + done.stderr)[-2000:]
    assert started and _ours(home) == []  # the SuperLink Flower started ran, and is stopped
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-2000:]
    rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [1, 2]
    calm = run(RunConfig(model="tiny", clients=2, rounds=2, local_steps=1, budgets="5MB,20MB", val_size=4,
                         batch_size=4, split_rule="deepest", output_dir=str(tmp_path / "calm"))).metrics  # fmt: skip
    for ours, theirs in zip(rounds, calm, strict=True):
        for name in ("train_loss", "val_loss", "sim_time_s", "bytes_up", "bytes_down"):
            assert ours[name] == pytest.approx(theirs[name], rel=1e-6), (ours["round"], name)


def test_the_app_resumes_only_a_run_it_names_with_its_own_settings(tmp_path):
    from hsplitlora.engines.flower_app import load

    with pytest.raises(UsageError, match="give output-dir"):
        load({"resume": True})
    with pytest.raises(UsageError, match="drop lr"):
        load({"resume": True, "output-dir": str(tmp_path), "lr": 0.1})
    with pytest.raises(UsageError, match="cannot resume"):
        load({"resume": True, "output-dir": str(tmp_path / "nothing"), "rounds": 3})
    with pytest.raises(UsageError, match="resume takes true or false"):
        load({"resume": "yes"})
