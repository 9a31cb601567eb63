"""Issue 26: every command bounded (no hang, long inputs refused or estimated fast, signals
honoured), no traceback from any input (files that are not regular files, non-UTF-8 config files,
broken pipes), and `plan` and `compare` checking their settings exactly as `run` does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hsplitlora.cli import main
from hsplitlora.config import FLAGS
from hsplitlora.lora.attach import attach_lora
from hsplitlora.method import memory as memory_model
from hsplitlora.models.architectures import architecture_of
from hsplitlora.models.loading import load_model
from hsplitlora.planning import PlanRequest, make_plan

SRC = str(Path(__file__).resolve().parents[1] / "src")


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


def one_sentence(err: str, *parts: str) -> str:
    lines = [line for line in err.strip().splitlines() if "error:" in line or "Traceback" in line]
    assert "Traceback" not in err and len(lines) == 1, err
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# -- hangs: estimates without allocation, early refusals, Ray, signals ---------------------------


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_long_sequence_is_predicted_exactly_from_short_ones(attention):
    """Eager attention saves b*h*T*T weights: the parabola through three short lengths still equals
    the measurement at a long one."""
    loaded = load_model("tiny", seed=0)
    loaded.model.config._attn_implementation = attention
    attach_lora(loaded.model, ["q", "k", "v", "o"])
    arch = architecture_of(loaded.model)
    weights = {p.untyped_storage().data_ptr() for p in loaded.model.parameters()}
    for batch, length in ((1, 1500), (2, 2048)):
        assert length > memory_model.LONGEST_MEASURED
        predicted = memory_model._activations_at(loaded.model, arch, 1, weights, batch, length)
        assert predicted == memory_model._activations(loaded.model, arch, 1, weights, batch, length)


def test_plan_at_a_million_tokens_answers_in_seconds():
    """Issue 26: a 10^6-token memory model ran attention over 10^12 positions for over 10 minutes."""
    loaded = load_model("tiny", seed=0)
    loaded.model.config.max_position_embeddings = 10**6  # as a long-context model would allow
    request = PlanRequest(budgets=[10**15], server_budget=10**16, batch_size=2, seq_len=10**6,
                          uniform_importance=True, split_rule="deepest")  # fmt: skip
    started = time.perf_counter()
    result = make_plan(loaded, request)
    assert time.perf_counter() - started < 20
    request.seq_len = 500
    short = make_plan(load_model("tiny", seed=0), request).memory
    assert result.memory.block_activation_bytes >= 2000 * short.block_activation_bytes  # at least linear in T
    assert result.plan.clients[0].predicted_bytes > 10**10


def test_a_sequence_beyond_the_model_positions_is_refused_before_anything_is_built(tmp_path, capsys):
    started = time.perf_counter()
    assert run_cli("plan", "--model", "tiny", "--budgets", "20MB", "--seq-len", "1000000") == 2
    one_sentence(capsys.readouterr().err, "max_seq_len 1000000 exceeds the 512 positions", "use 1 to 512")
    out = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--max-seq-len", "100000", "--output-dir", str(out)) == 2
    one_sentence(capsys.readouterr().err, "max_seq_len 100000 exceeds the 512 positions", "use 1 to 512")
    assert time.perf_counter() - started < 30
    assert not out.exists() or not any(out.iterdir())


def test_a_ray_address_nobody_answers_at_ends_in_seconds_with_a_sentence(tmp_path, capsys):
    ray = pytest.importorskip("ray")
    out = tmp_path / "run"
    started = time.perf_counter()
    code = run_cli("run", "--model", "tiny", "--clients", "2", "--engine", "ray", "--ray-address", "127.0.0.1:1",
                   "--output-dir", str(out))  # fmt: skip
    assert code == 2 and time.perf_counter() - started < 30
    one_sentence(capsys.readouterr().err, "no Ray cluster answers at 127.0.0.1:1", "ray start --head")
    assert not ray.is_initialized()  # nothing of Ray was started, so nothing is left running
    assert not out.exists() or not any(out.iterdir())


LONG_KERNEL = textwrap.dedent("""
    import sys, torch
    from hsplitlora.cli import _terminate
    from hsplitlora import interrupts
    import signal
    torch.set_num_threads(1)
    signal.signal(signal.SIGTERM, _terminate)
    # A shell starts background jobs with SIGINT ignored, and Python keeps an inherited "ignore":
    # give this process Python's own Ctrl-C handler, as an interactive command has.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    a = torch.ones(6000, 6000)
    with interrupts.exit_promptly_on_signals(grace_s=1.0):
        interrupts.exit_note = lambda: "interrupted; what the command says on leaving"
        print("computing", flush=True)
        for _ in range(20):
            a @ a  # one kernel of seconds: Python's own handler waits for it to return
    print("finished", flush=True)
""")


@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_one_long_computation_ends_the_process_promptly(signum, status):
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-c", LONG_KERNEL], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env)  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "computing"
        time.sleep(0.5)
        process.send_signal(signum)
        sent = time.perf_counter()
        process.wait(timeout=20)
        waited = time.perf_counter() - sent
    finally:
        process.kill()
    assert process.returncode == status
    assert waited < 6  # 1 s of grace, not the 20 products' minute
    err = process.stderr.read()
    assert "finished" not in process.stdout.read() and "Traceback" not in err
    assert "interrupted; what the command says on leaving" in err


# -- tracebacks: files that are not regular files, non-UTF-8 config files, broken pipes -----------


def test_files_that_are_not_regular_files_are_refused_by_name(tmp_path, capsys):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.jsonl"
    zero.symlink_to("/dev/zero")
    outputs = tmp_path / "outputs.txt"
    outputs.write_text("a\n")
    assert run_cli("score", str(zero), str(outputs)) == 2
    one_sentence(capsys.readouterr().err, f"references file {zero} (a link to /dev/zero) is a character device")
    assert run_cli("score", str(fifo), str(outputs)) == 2
    one_sentence(capsys.readouterr().err, f"references file {fifo} is a named pipe (FIFO), not a regular file")
    assert run_cli("run", "--config", str(fifo)) == 2
    one_sentence(capsys.readouterr().err, f"config file {fifo} is a named pipe")
    for data in (zero, fifo):  # reported as "does not exist" before
        assert run_cli("run", "--model", "tiny", "--data", str(data), "--output-dir", str(tmp_path / "run")) == 2
        one_sentence(capsys.readouterr().err, f"data file {data}", "not a regular file")
    dangling = tmp_path / "gone.jsonl"
    dangling.symlink_to(tmp_path / "nothing.jsonl")
    assert run_cli("run", "--model", "tiny", "--data", str(dangling), "--output-dir", str(tmp_path / "run")) == 2
    one_sentence(capsys.readouterr().err, f"data file {dangling} (a link to", "does not exist")


def test_a_config_file_that_is_not_utf8_gets_a_sentence(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_bytes(b"rounds: 1\nmodel: \xff\xfe\n")
    assert run_cli("run", "--config", str(path)) == 2
    one_sentence(capsys.readouterr().err, f"config file {path}", "UTF-8", "0xff")


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    references, outputs = tmp_path / "refs.txt", tmp_path / "outputs.txt"
    references.write_text("a cheap pub\n\nan Italian place\n")
    outputs.write_text("a cheap pub\nan Italian place\n")
    env = {**os.environ, "PYTHONPATH": SRC}
    process = subprocess.Popen([sys.executable, "-m", "hsplitlora", "score", str(references), str(outputs), "--json"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)  # fmt: skip
    process.stdout.close()  # as `| head` does once it has its lines
    _, err = process.communicate(timeout=120)
    assert process.returncode == 141
    assert b"Traceback" not in err and b"BrokenPipeError" not in err


# -- plan and compare check their settings as run does -------------------------------------------


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--server-flops", "nan"], "server_flops must be a finite number, got nan"),
        (["--server-flops", "-1"], "server_flops must be a positive number, got -1"),
        (["--seed", "-1"], "seed must be an integer from 0 to 4294967295, got -1"),
        (["--targets", ""], "targets [] are not valid"),
        (["--targets", "q,q,v"], "name q more than once"),
        (["--levels", "2,4"], "rank_levels [2, 4] must be distinct non-negative integers including 0"),
        (["--rho", "1.5"], "rho must be in [0, 1), got 1.5"),
        (["--batch-size", "0"], "batch_size must be a positive integer, got 0"),
    ],
)  # fmt: skip
def test_plan_refuses_exactly_what_run_refuses(tmp_path, capsys, flags, message):
    assert run_cli("plan", "--model", "tiny", "--budgets", "20MB", *flags) == 2
    planned = one_sentence(capsys.readouterr().err, message).split("error: ", 1)[1]
    name = flags[0][2:].replace("-", "_")
    key = {"levels": "rank_levels", "seq_len": "max_seq_len"}.get(name, name)
    run_flags = ["--" + key.replace("_", "-"), flags[1]]
    if key not in FLAGS:  # a config-file key of run
        value = f"[{flags[1]}]" if key == "rank_levels" else flags[1]
        (tmp_path / "run.yaml").write_text(f"{key}: {value}\n")
        run_flags = ["--config", str(tmp_path / "run.yaml")]
    assert run_cli("run", "--model", "tiny", "--budgets", "20MB", "--clients", "1", *run_flags,
                   "--output-dir", str(tmp_path / "run")) == 2  # fmt: skip
    assert one_sentence(capsys.readouterr().err, message).split("error: ", 1)[1] == planned


def test_plan_with_every_client_left_out_is_refused_not_an_empty_plan(capsys):
    code = run_cli("plan", "--model", "tiny", "--budgets", "1KB,2KB", "--leave-out-infeasible", "--uniform-importance")
    assert code == 2
    captured = capsys.readouterr()
    one_sentence(captured.err, "no client's budget holds a cut", "client 1 cannot take part")
    assert "ARMSC plan" not in captured.out


@pytest.mark.parametrize("value", ["nan", "-5", "inf", "0.5"])
def test_compare_refuses_a_target_perplexity_that_is_none(tmp_path, capsys, value):
    code = run_cli("compare", "--strategies", "hsplitlora,splitlora", "--model", "tiny", "--target-ppl", value,
                   "--output-dir", str(tmp_path / "cmp"))  # fmt: skip
    assert code == 2
    one_sentence(capsys.readouterr().err, "target-ppl must be a perplexity")
    assert not (tmp_path / "cmp").exists()


def test_eval_refuses_a_length_penalty_that_is_not_finite(tmp_path, capsys):
    assert run_cli("eval", str(tmp_path), "--length-penalty", "nan") == 2
    one_sentence(capsys.readouterr().err, "length-penalty must be a finite number", "got nan")
