"""`hsplitlora compare`: several strategies on identical data, budgets and seed, side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hsplitlora import folders
from hsplitlora.checks import check
from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.plots import whole_model
from hsplitlora.reporting import check_output_folder, check_run_folder, refuse_clobbering, write_json_atomic
from hsplitlora.rounds import Reporter, RunResult, run
from hsplitlora.strategies import STRATEGIES


def time_to_target(metrics: list[dict], target: float) -> tuple[float | None, float | None]:
    """(simulated, wall) seconds at the first evaluation at or below the target perplexity."""
    for line in metrics:
        if line["val_ppl"] is not None and line["val_ppl"] <= target:
            return line["sim_time_s"], line["wall_time_s"]
    return None, None


def compare(
    config: RunConfig,
    strategies: list[str],
    output_dir: Path,
    target_ppl: float | None = None,
    reporter_for=None,
    log=None,
    overwrite: bool = False,
) -> dict:
    """Every strategy's settings and the folder are checked before the first one trains."""
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise UsageError(f"strategy {(unknown or [''])[0]!r} is unknown; choose from {', '.join(STRATEGIES)}.")
    if len(set(strategies)) < len(strategies):
        raise UsageError(f"strategies {','.join(strategies)} name one strategy twice; list each once.")
    output_dir = check_output_folder(output_dir, "comparison folder")
    folders.check_not_inside(output_dir, "comparison folder")
    folders.check_kind(output_dir, "comparison", "comparison folder")
    folders.check_foreign(
        output_dir, folders.COMPARISON_FILES, "a comparison file", "choose another --output-dir, or move it away."
    )
    if not overwrite:
        refuse_clobbering(output_dir, ("comparison.json", *strategies), "a comparison",
                          "give --overwrite to replace it, or another --output-dir.")  # fmt: skip
    configs = {s: check(dataclasses.replace(config, strategy=s, output_dir=str(output_dir / s))) for s in strategies}
    for strategy in strategies:
        check_run_folder(output_dir / strategy, overwrite=overwrite)
    if overwrite:  # the earlier comparison's files and runs, all of them (it may have had other strategies)
        folders.clear(output_dir)
    results: dict[str, RunResult] = {}
    for strategy, one in configs.items():
        folders.record(output_dir, "comparison", runs=[strategy])
        reporter = reporter_for(strategy) if reporter_for else Reporter()
        results[strategy] = run(one, reporter=reporter, log=log, overwrite=overwrite)
    finals = {s: r.summary["final_val_ppl"] for s, r in results.items()}
    target = target_ppl if target_ppl is not None else max(finals.values())
    rows = []
    for strategy, result in results.items():
        sim, wall = time_to_target(result.metrics, target)
        rows.append({
            "strategy": strategy,
            "final_val_ppl": finals[strategy],
            "sim_time_to_target_s": sim,
            "wall_time_to_target_s": wall,
            "sim_time_s": result.summary["sim_time_s"],
            "bytes": result.summary["bytes_up"] + result.summary["bytes_down"],
            "peak_client_bytes": result.summary["peak_client_predicted_bytes"],
            "whole_model_on_clients": whole_model(strategy),
            "run_dir": str(result.run_dir),
        })  # fmt: skip
    summary = {"target_ppl": target, "rows": rows}
    folders.record(output_dir, "comparison", folders.COMPARISON_FILES)
    write_json_atomic(output_dir / "comparison.json", summary)
    from hsplitlora.plots import plot_comparison

    summary["plot"] = str(plot_comparison(results, target, output_dir / "comparison.png"))
    return summary
