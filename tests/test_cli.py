"""The command line: a short tiny run works; each bad value exits 2 with one clear sentence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hsplitlora.cli import main


def run_cli(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


def read_metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_tiny_run_exits_zero(tmp_path, capsys):
    out_dir = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--steps", "3", "--clients", "2", "--val-size", "16",
                   "--output-dir", str(out_dir)) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "hsplitlora on tiny: 2 rounds x 3 steps" in out and str(out_dir) in out
    assert [m["round"] for m in read_metrics(out_dir)] == [1, 2]


def test_config_file_and_flags_share_names(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: tiny\nsteps: 2\nrounds: 1\nclients: 2\nsplit-point: [1, 3]\nrank: 4\n"
                      f"val_size: 8\noutput_dir: {tmp_path / 'run'}\n")  # fmt: skip
    assert run_cli("run", "--config", str(config), "--rank", "2") == 0
    (line,) = read_metrics(tmp_path / "run")
    # client 1: split point 3 from the file, rank 2 from the flag on its 3 blocks x 4 matrices
    assert [c["split_point"] for c in line["clients"]] == [1, 3]
    assert [c["client_rank_total"] for c in line["clients"]] == [1 * 4 * 2, 3 * 4 * 2]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--model", "tiny", "--split-point", "9"], "split point 9 is out of range"),
        (["--model", "tiny", "--rank", "-1"], "rank must be 0 (no adapter) or a positive integer, got -1"),
        (["--model", "tiny", "--data-dir", "/nonexistent"], "data file /nonexistent/devset.csv does not exist"),
        (["--model", "tiny", "--clients", "0"], "clients must be a positive integer, got 0"),
        (["--model", "tiny", "--split-point", "1,2"], "split_point lists 2 values but there are 5 clients"),
        (["--model", "tiny", "--targets", "q,zz"], "targets ['q', 'zz'] are not valid"),
        (["--model", "tiny-gpt2", "--targets", "gate"], "target 'gate' does not exist in gpt2 models"),
        (["--config", "/nonexistent.yaml"], "config file /nonexistent.yaml does not exist"),
        (["--model", "tiny", "--strategy", "nope"], "strategy 'nope' is unknown"),
        (["--model", "tiny", "--partition", "weird"], "partition 'weird' is unknown"),
        (["--model", "tiny", "--device-preset", "mars"], "device preset 'mars' is unknown"),
        (["--model", "tiny", "--budgets", "1KB"], "client 0 cannot take part"),
        (["--model", "tiny", "--budgets", "2MB,8MB"], "budgets lists 2 sizes but there are 5 clients"),
    ],
)
def test_bad_values_exit_2_with_a_sentence(args, message, capsys, tmp_path):
    assert run_cli("run", "--steps", "1", "--output-dir", str(tmp_path / "run"), *args) == 2
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before training
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_empty_dataset_exits_2(tmp_path, capsys):
    (tmp_path / "devset.csv").write_text("mr,ref\n")
    assert run_cli("run", "--model", "tiny", "--data-dir", str(tmp_path)) == 2
    assert "holds no examples" in capsys.readouterr().err


def test_unparsable_flag_exits_2_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "hsplitlora", "run", "--rank", "eight"], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert "'eight' is not an integer" in proc.stderr and "Traceback" not in proc.stderr


def test_plan_json_matches_the_schema(capsys):
    assert run_cli("plan", "--model", "tiny", "--budgets", "5MB,8MB,20MB", "--batch-size", "4", "--seq-len", "64",
                   "--json") == 0  # fmt: skip
    plan = json.loads(capsys.readouterr().out)
    assert [c["client"] for c in plan["clients"]] == [0, 1, 2]
    for client, budget in zip(plan["clients"], [5_000_000, 8_000_000, 20_000_000], strict=True):
        assert set(client) == {"client", "budget_bytes", "split_point", "ranks", "predicted_bytes", "recompute"}
        assert client["recompute"] is False  # recompute is off unless asked
        assert client["budget_bytes"] == budget and client["predicted_bytes"] <= budget
        assert 1 <= client["split_point"] <= 3
        assert all(name.startswith("model.layers.") and r in (0, 2, 4, 8, 16) for name, r in client["ranks"].items())
    assert plan["clients"][0]["split_point"] <= plan["clients"][2]["split_point"]
    assert {"budget_bytes", "frozen_bytes", "clients"} <= set(plan["server"])


def test_plan_table_and_warmup_importance(capsys):
    assert run_cli("plan", "--model", "tiny", "--budgets", "5MB,20MB", "--warmup-batches", "1") == 0
    out = capsys.readouterr().out
    assert "ARMSC plan" in out and "warm-up pass of 1 batches" in out and "headroom" in out


@pytest.mark.parametrize(
    "budgets, message",
    [
        ("1.5XB", "budget '1.5XB' is not a memory size"),
        ("2GB,,3GB", "has an empty entry"),
        ("10KB,20MB", "client 0 cannot take part: its budget of 10 kB lacks"),
    ],
)
def test_plan_bad_budgets_exit_2(budgets, message, capsys):
    assert run_cli("plan", "--model", "tiny", "--uniform-importance", "--budgets", budgets) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_compare_runs_each_strategy_on_the_same_setup(tmp_path, capsys):
    out_dir = tmp_path / "cmp"
    assert run_cli("compare", "--strategies", "hsplitlora,splitlora", "--model", "tiny", "--budgets",
                   "5MB,6MB,8MB,12MB,20MB", "--rounds", "1", "--steps", "1", "--val-size", "8",
                   "--output-dir", str(out_dir)) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "hsplitlora" in out and "splitlora" in out and "target perplexity" in out
    comparison = json.loads((out_dir / "comparison.json").read_text())
    assert [row["strategy"] for row in comparison["rows"]] == ["hsplitlora", "splitlora"]
    assert (out_dir / "comparison.png").is_file() and (out_dir / "splitlora" / "metrics.jsonl").is_file()
    # the worst final perplexity is the default target, so every strategy reaches it
    assert all(row["sim_time_to_target_s"] is not None for row in comparison["rows"])


def test_eval_of_a_run_folder(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--budgets", "5MB", "--clients", "2", "--rounds", "1", "--steps", "1",
                   "--val-size", "8", "--output-dir", str(run_dir)) == 0  # fmt: skip
    assert run_cli("eval", str(run_dir), "--limit", "3", "--beams", "2", "--max-new-tokens", "6") == 0
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["mrs"] == 3 and set(result["metrics"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    assert len((run_dir / "predictions.txt").read_text().splitlines()) == 3
    assert run_cli("eval", str(tmp_path / "nothing")) == 2
    assert "is not a finished run folder" in capsys.readouterr().err


def test_merged_export_reloads_with_transformers_and_gives_the_same_logits(tmp_path, capsys):
    import torch
    from transformers import AutoModelForCausalLM

    from hsplitlora.evaluation.run_eval import load_run_model

    run_dir = tmp_path / "run"
    assert run_cli("run", "--model", "tiny-gpt2", "--budgets", "12MB", "--clients", "2", "--rounds", "1",
                   "--steps", "2", "--val-size", "8", "--output-dir", str(run_dir)) == 0  # fmt: skip
    assert run_cli("export", str(run_dir), "--merged", str(tmp_path / "hf")) == 0
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    trained, _ = load_run_model(run_dir)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    from hsplitlora.models.loading import load_model

    base = load_model("tiny-gpt2", seed=0).model  # the run's starting point: training changed q, k, v
    assert not torch.allclose(reloaded.transformer.h[0].attn.c_attn.weight, base.transformer.h[0].attn.c_attn.weight)
    torch.testing.assert_close(reloaded.transformer.h[0].mlp.c_fc.weight, base.transformer.h[0].mlp.c_fc.weight)
    assert run_cli("export", str(run_dir), "--merged", str(tmp_path / "hf")) == 2
    assert "is not empty" in capsys.readouterr().err


def test_adapter_export_loads_with_peft_and_reports_the_svd_error(tmp_path):
    import torch
    from peft import PeftModel

    from hsplitlora.evaluation.run_eval import load_run_model
    from hsplitlora.models.loading import load_model

    run_dir = tmp_path / "run"
    assert run_cli("run", "--model", "tiny", "--budgets", "8MB", "--clients", "2", "--rounds", "1", "--steps", "2",
                   "--val-size", "8", "--lr", "0.01", "--output-dir", str(run_dir)) == 0  # fmt: skip
    trained, _ = load_run_model(run_dir)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        expected = trained.model(input_ids=ids).logits

    # Full rank: the adapter reproduces the fine-tuned model.
    assert run_cli("export", str(run_dir), "--adapter", str(tmp_path / "full"), "--rank", "64") == 0
    model = PeftModel.from_pretrained(load_model("tiny").model, tmp_path / "full").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, expected, atol=1e-4, rtol=0)

    # Rank 2: the reported error is ||dW - B A|| / ||dW|| computed directly from the saved factors.
    assert run_cli("export", str(run_dir), "--adapter", str(tmp_path / "low"), "--rank", "2") == 0
    reported = json.loads((tmp_path / "low" / "approximation_error.json").read_text())["relative_frobenius_error"]
    model = PeftModel.from_pretrained(load_model("tiny").model, tmp_path / "low")
    base = load_model("tiny").model
    name = "model.layers.0.self_attn.q_proj"
    layer = model.base_model.model.get_submodule(name)
    delta = trained.model.get_submodule(name).base.weight - base.get_submodule(name).weight
    approx = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    direct = float(torch.linalg.norm(delta - approx) / torch.linalg.norm(delta))
    assert 0 < reported[name] < 1 and reported[name] == pytest.approx(direct, rel=1e-4)


def test_version(capsys):
    assert run_cli("--version") == 0
    assert capsys.readouterr().out.startswith("hsplitlora ")


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_outside_0_to_2_32_is_refused(seed, capsys, tmp_path):
    assert run_cli("run", "--model", "tiny", "--seed", seed, "--output-dir", str(tmp_path / "r")) == 2
    assert "seed must be an integer from 0 to 4294967295" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_numbers_written_as_people_write_them_in_yaml(tmp_path):
    from hsplitlora.checks import load_config

    config = tmp_path / "run.yaml"
    config.write_text("model: tiny\nlr: 1e-3\nalpha: 32\nserver_flops: 5e12\n")  # PyYAML reads 1e-3 as a string
    loaded = load_config(config)
    assert loaded.lr == 0.001 and loaded.server_flops == 5e12 and loaded.alpha == 32


# Both signals in process; Ray's own SIGTERM handler is put back by the same code either signal takes.
@pytest.mark.parametrize(
    "signal_name, code, engine", [("SIGTERM", 143, "inprocess"), ("SIGINT", 130, "inprocess"), ("SIGINT", 130, "ray")]
)
def test_an_interrupted_run_says_how_to_resume_and_resumes_to_the_same_numbers(signal_name, code, engine, tmp_path):
    import signal
    import time

    common = ["--model", "tiny", "--clients", "2", "--rounds", "5", "--steps", "2", "--val-size", "8",
              "--budgets", "5MB", "--engine", engine, "--threads", "1"]  # fmt: skip
    out = tmp_path / "run"
    # A job started in the background (`cmd &` in a script, as CI may run the suite) inherits SIGINT
    # ignored, and Python then keeps it ignored, as a program should: the run is given the default.
    child = subprocess.Popen([sys.executable, "-m", "hsplitlora", "run", *common, "--output-dir", str(out)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    deadline = time.monotonic() + 180
    while not (out / "checkpoint" / "state.json").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    child.send_signal(getattr(signal, signal_name))
    _, err = child.communicate(timeout=180)
    if child.returncode == 0:
        pytest.skip("the run finished before the signal arrived")
    assert child.returncode == code, err[-2000:]
    assert f"hsplitlora run --resume {out}" in err and "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "hsplitlora", "run", "--resume", str(out)], capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    straight = tmp_path / "straight"  # in process: the engines give the same numbers (tests/test_golden.py)
    in_process = [value if value != "ray" else "inprocess" for value in common]
    assert run_cli("run", *in_process, "--output-dir", str(straight)) == 0
    for a, b in zip(read_metrics(straight), read_metrics(out), strict=True):
        for key in ("train_loss", "val_loss", "sim_time_s", "bytes_up", "bytes_down"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (a["round"], key)


def test_plan_cuts_as_run_does_by_default_and_by_memory_with_split_rule_deepest(capsys):
    common = ["plan", "--model", "tiny", "--budgets", "5MB,8MB,20MB", "--batch-size", "4", "--seq-len", "128",
              "--uniform-importance", "--json"]  # fmt: skip
    assert run_cli(*common) == 0
    fastest = [c["split_point"] for c in json.loads(capsys.readouterr().out)["clients"]]
    assert run_cli(*common, "--split-rule", "deepest") == 0
    deepest = [c["split_point"] for c in json.loads(capsys.readouterr().out)["clients"]]
    assert deepest == sorted(deepest) and deepest[0] < deepest[-1]  # the memory rule follows the budgets
    assert fastest == [1, 1, 1]  # 200 GFLOP/s devices against a 20 TFLOP/s server: the shallowest cut
