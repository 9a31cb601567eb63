"""The reproduction study: the --quick study runs every strategy end to end in every regime, and the
committed docs/results.md shows exactly the tables its committed results JSON gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from study import ALL_LABELS, MAIN, QUICK, main, planned_runs, tables_in, tables_markdown, verdict

ROOT = Path(__file__).resolve().parents[1]


def test_quick_study_runs_every_strategy_and_writes_tables_and_plots(tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["--quick", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]
    assert len(runs) == len(planned_runs(QUICK))
    assert {r["strategy"] for r in runs if r["regime"] == QUICK.main_regime} == set(ALL_LABELS)
    for regime in QUICK.regimes:
        for strategy in MAIN:
            seeds = {r["seed"] for r in runs if r["regime"] == regime.name and r["strategy"] == strategy}
            assert seeds == set(range(QUICK.seeds))
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
    for strategy in ALL_LABELS:
        assert f"| {strategy} |" in tables
    for regime in QUICK.regimes:
        assert f"### Regime {regime.name}:" in tables
        assert len(verdict(results, regime.name)) == len(MAIN) - 1
    for name in ("ppl_vs_simulated_time.png", "ppl_vs_wall_time.png", "final_ppl.png"):
        assert (out / name).stat().st_size > 10_000
    assert "results:" in capsys.readouterr().out

    # A second call reuses every finished run instead of training again.
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/summary.json")}
    assert main(["--quick", "--out", str(out), "--no-eval"]) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.glob("*/*/seed*/summary.json")}


def test_committed_results_document_matches_the_committed_results_json():
    results_path, document = ROOT / "docs" / "results" / "results.json", ROOT / "docs" / "results.md"
    if not results_path.is_file():
        pytest.fail("docs/results/results.json is missing: run python benchmarks/reproduce.py --doc docs/results.md")
    results = json.loads(results_path.read_text())
    assert results["spec"]["model"] == "smollm2-135m"
    assert tables_in(document.read_text()) == tables_markdown(results)
