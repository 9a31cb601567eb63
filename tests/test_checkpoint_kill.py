"""A run killed (SIGKILL) in the middle of writing a checkpoint resumes from the previous one and
ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import subprocess
import sys

import pytest
from safetensors.torch import load_file

from hsplitlora.config import RunConfig
from hsplitlora.rounds import resume_config, run

CONFIG = dict(model="tiny", rounds=3, local_steps=2, budgets="5MB,6MB,8MB,12MB,20MB", val_size=8, batch_size=4)

# Runs the same configuration in a child process that kills itself with SIGKILL during round 2's
# checkpoint: either half-way through writing state.json, or between moving the old checkpoint
# aside and moving the new one in.
CHILD = """
import os, signal, sys
from pathlib import Path
import hsplitlora.reporting as reporting
from hsplitlora.config import RunConfig
from hsplitlora.rounds import run

where, output = sys.argv[1], sys.argv[2]
seen = {"state": 0, "swap": 0}
real_json, real_replace = reporting.write_json_atomic, os.replace

def json_hook(path, data):
    if path.name == "state.json":
        seen["state"] += 1
        if seen["state"] == 2 and where == "writing":
            with open(path.with_name(".state.json.partial"), "w") as handle:
                handle.write('{"round": 2, "plan": {"cli')
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
    real_json(path, data)

def replace_hook(source, target):
    if Path(target).name == "checkpoint" and Path(source).name.startswith(".checkpoint-"):
        seen["swap"] += 1
        if seen["swap"] == 2 and where == "swapping":
            os.kill(os.getpid(), signal.SIGKILL)
    real_replace(source, target)

reporting.write_json_atomic = json_hook
os.replace = replace_hook
run(RunConfig(output_dir=output, **%r))
"""


@pytest.mark.parametrize("where", ["writing", "swapping"])
def test_a_run_killed_while_writing_a_checkpoint_resumes_from_the_previous_one(where, tmp_path):
    killed = tmp_path / "killed"
    child = subprocess.run([sys.executable, "-c", CHILD % CONFIG, where, str(killed)], capture_output=True, text=True)
    assert child.returncode == -9, child.stderr[-2000:]
    assert not (killed / "model.safetensors").exists()

    config = resume_config(killed)
    result = run(config, resume=True)
    assert [m["round"] for m in result.metrics] == [1, 2, 3]
    assert not [p for p in killed.glob(".checkpoint-*")]  # the half-written staging is gone

    straight = run(RunConfig(output_dir=str(tmp_path / "straight"), **CONFIG))
    resumed, reference = load_file(killed / "model.safetensors"), load_file(straight.run_dir / "model.safetensors")
    assert resumed.keys() == reference.keys()
    for name in reference:
        assert resumed[name].equal(reference[name]), name
    assert [m["val_ppl"] for m in result.metrics] == pytest.approx([m["val_ppl"] for m in straight.metrics])
