"""The reproduction study: the --quick study runs every strategy end to end in every regime, and the
committed docs/results.md shows exactly the tables its committed results JSON gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study import ABLATIONS, MAIN, QUICK, REFERENCES, main, planned_runs, tables_in, tables_markdown, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_runs_every_strategy_and_writes_tables_and_plots(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    # A finished run keeps no checkpoint (1-2 GB each on SmolLM2; only resuming it read it).
    assert not list(out.glob("*/*/seed*/checkpoint"))
    runs = results["runs"]
    assert len(runs) == len(planned_runs(QUICK))
    assert {r["strategy"] for r in runs if r["regime"] == QUICK.main_regime} == set(MAIN + ABLATIONS + REFERENCES)
    for regime in QUICK.regimes:
        for strategy in regime.labels:
            seeds = {r["seed"] for r in runs if r["regime"] == regime.name and r["strategy"] == strategy}
            assert seeds == set(range(QUICK.seeds))
        for strategy in regime.ablations:
            assert {r["seed"] for r in runs if r["regime"] == regime.name and r["strategy"] == strategy} == {0}
    # A regime with client sampling: every run's config and rounds say who trained.
    sampled = next(r for r in QUICK.regimes if r.clients_per_round)
    for run_dir in (out / sampled.name).glob("*/seed*"):
        assert json.loads((run_dir / "config.json").read_text())["clients_per_round"] == sampled.clients_per_round
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert all(len(line["sampled_clients"]) == sampled.clients_per_round for line in lines), run_dir
    for run in runs:
        assert run["curve"] and all(point["val_ppl"] > 1 for point in run["curve"])
        assert len(run["curve"]) == QUICK.rounds
        if run["seed"] == 0 and run["regime"] == QUICK.main_regime and run["strategy"] in MAIN:
            assert set(run["e2e"]) == {"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}
    # Every run sees the same number of training samples per round, whatever its strategy.
    for run_dir in (out / QUICK.main_regime).glob("*/seed0"):
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert sum(c["samples"] for c in lines[0]["clients"]) == 5 * QUICK.local_steps * QUICK.batch_size, run_dir
    # The ablation with re-created adapters is hsplitlora with that one setting changed.
    config = json.loads((out / QUICK.main_regime / "hsplitlora-recreate" / "seed0" / "config.json").read_text())
    assert config["strategy"] == "hsplitlora" and config["adapter_lifecycle"] == "recreate"
    tables = (out / "tables.md").read_text()
    assert tables == tables_markdown(results)
    for strategy in {r["strategy"] for r in runs}:
        assert f"| {strategy} |" in tables
    for regime in QUICK.regimes:
        assert f"### Regime {regime.name}:" in tables
        assert len(verdict(results, regime.name)) == len(regime.labels) - 1
    for name in ("ppl_vs_simulated_time.png", "ppl_vs_wall_time.png", "final_ppl.png"):
        assert (out / name).stat().st_size > 10_000
    assert "results:" in capsys.readouterr().out

    # A second call reuses every finished run instead of training again.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/summary.json")}
    assert main(["--quick", "--out", str(out), "--no-eval"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/summary.json")}
    # A run the study was stopped in continues from its checkpoint, not from the start: trained
    # again with its checkpoint kept, then stopped before its summary was written.
    import study

    stopped = out / QUICK.main_regime / "hsplitlora" / "seed1"
    only = ["--quick", "--out", str(out), "--no-eval", "--only", f"{QUICK.main_regime}/hsplitlora/1"]
    (stopped / "summary.json").unlink()
    with monkeypatch.context() as patch:
        patch.setattr(study, "_forget_checkpoint", lambda run_dir: None)
        assert main(only) == 0
    assert (stopped / "checkpoint").is_dir()
    metrics = (stopped / "metrics.jsonl").read_text()
    (stopped / "summary.json").unlink()
    assert main(only) == 0
    assert (stopped / "summary.json").is_file() and (stopped / "metrics.jsonl").read_text() == metrics
    assert not (stopped / "checkpoint").exists()


def test_committed_results_document_matches_the_committed_results_json():
    results_path, document = ROOT / "docs" / "results" / "results.json", ROOT / "docs" / "results.md"
    if not results_path.is_file():
        pytest.fail("docs/results/results.json is missing: run python benchmarks/reproduce.py --doc docs/results.md")
    results = json.loads(results_path.read_text())
    assert results["spec"]["model"] == "smollm2-135m"
    assert tables_in(document.read_text()) == tables_markdown(results)


def _fake_results(ours: list[float], theirs: list[float], cuts: list[list[int]]) -> dict:
    def run(label: str, seed: int, ppl: float) -> dict:
        curve = [{"round": 1, "sim_time_s": 10.0 * (1 + (label != "hsplitlora")), "wall_time_s": 1.0, "val_ppl": ppl}]
        return {"regime": "ii", "strategy": label, "seed": seed, "final_val_ppl": ppl, "curve": curve,
                "bytes_per_client": [1, 2], "peak_client_bytes": 100e6 + 10e6 * seed, "split_points": cuts[seed],
                "client_rank_totals": [32, 64], "run_of_regime": "ii"}  # fmt: skip

    runs = [run("hsplitlora", s, p) for s, p in enumerate(ours)]
    runs += [run("splitlora", s, p) for s, p in enumerate(theirs)]
    regime = {"name": "ii", "title": "t", "budgets": ["1GB", "2GB"], "gflops": [1, 2], "mbps": [1, 2],
              "server_flops": 1e12, "goal": "win"}  # fmt: skip
    results = {"spec": {"regimes": [regime], "eval_mrs": 1, "beams": 1}, "runs": runs,
               "budgets_bytes": {"ii": [10**9, 2 * 10**9]}}  # fmt: skip
    results["targets"] = {"ii": 10.0}  # every run reaches it after its one round
    return results


def test_the_verdict_judges_paired_differences_per_seed_and_the_table_shows_every_seeds_plan():
    # Seeds differ by far more than the methods do, but on every seed splitlora is 0.05 higher.
    results = _fake_results([3.0, 4.0, 5.0], [3.05, 4.06, 5.04], [[1, 2], [1, 3], [1, 2]])
    (line,) = verdict(results, "ii")
    assert "beyond the paired spread 0.010" in line and "per seed: +0.050, +0.060, +0.040" in line
    assert "time ratio per seed 2.00x, 2.00x, 2.00x" in line and "goal met" in line
    tables = tables_markdown(results)
    assert "seed 0: 1, 2; seed 1: 1, 3; seed 2: 1, 2" in tables  # each seed's cuts, not seed 0's
    assert "seed 0: 100.0; seed 1: 110.0; seed 2: 120.0" in tables  # each seed's peak memory
    # Differences that change sign from seed to seed are within their spread: the goal is not met.
    (line,) = verdict(_fake_results([3.0, 4.0, 5.0], [3.05, 3.95, 5.02], [[1, 2]] * 3), "ii")
    assert "within the paired spread" in line and "goal not met" in line


def test_a_split_plan_over_the_main_server_s_share_does_not_fit_and_is_left_out_of_the_verdict():
    results = _fake_results([3.0, 4.0, 5.0], [3.05, 4.06, 5.04], [[1, 2]] * 3)
    results["server_share_bytes"] = {"ii": 800 * 10**6}
    for run in results["runs"]:
        run["server_predicted_bytes"] = [937 * 10**6 if run["strategy"] == "splitlora" else 790 * 10**6] * 2
    (line,) = verdict(results, "ii")
    assert line == ("- vs splitlora: left out, it does not fit: its plan needs up to 937 MB of the main server for a "
                    "client, whose share per client training at once is 800 MB")  # fmt: skip
    assert "| splitlora | 3 |" in tables_markdown(results) and " ‡ |" in tables_markdown(results)


def test_only_names_runs_of_the_study(capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--quick", "--only", "v/hsplitlora/0,v/nosuch/0"])
    assert caught.value.code == 2
    assert "--only v/nosuch/0: not a run of the study" in capsys.readouterr().err


def test_a_run_of_the_older_batch_stream_is_retrained_only_when_asked(tmp_path):
    """A finished run whose config predates the warm-up's own batch stream (no clients_per_round)
    is stale for a strategy that warms up, still the same run for one that does not, and is
    reported, marked, when the study is not asked to train it."""
    from study import _same_config, regime_of, run_config, run_study

    def write(label: str) -> Path:
        run_dir = tmp_path / "runs" / "i" / label / "seed0"
        config = run_config(QUICK, regime_of(QUICK, "i"), label, 0, run_dir)
        saved = {k: v for k, v in json.loads(json.dumps(config.__dict__)).items() if k != "clients_per_round"}
        run_dir.mkdir(parents=True)
        (run_dir / "config.json").write_text(json.dumps(saved))
        return run_dir

    warms, plain = write("hsplitlora"), write("splitlora-paper")
    config = run_config(QUICK, regime_of(QUICK, "i"), "hsplitlora", 0, warms)
    assert not _same_config(warms, config)
    assert _same_config(warms, config, old_stream=True)
    assert _same_config(plain, run_config(QUICK, regime_of(QUICK, "i"), "splitlora-paper", 0, plain))
    # Finished (a summary and metrics), not asked for: collected with the mark, nothing trained.
    source = ROOT / "docs/results/runs/v/hsplitlora/seed0"
    for name in ("metrics.jsonl", "summary.json"):
        (warms / name).write_text((source / name).read_text())
    results = run_study(QUICK, tmp_path / "runs", tmp_path / "results", log=lambda m: None, only=("ii/nosuch/0",))
    (record,) = results["runs"]
    assert record["strategy"] == "hsplitlora" and record["older_stream"] is True
    assert "§" in tables_markdown(results)
