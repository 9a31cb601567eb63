"""`hsplitlora compare`: several strategies on identical data, budgets and seed, side by side."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from hsplitlora.config import RunConfig
from hsplitlora.errors import UsageError
from hsplitlora.reporting import check_output_folder, refuse_clobbering, write_json_atomic
from hsplitlora.rounds import Reporter, RunResult, run
from hsplitlora.strategies import STRATEGIES


def whole_model(strategy: str) -> bool:
    """Whether the strategy runs the whole model on every client (or one central trainer)."""
    return not STRATEGIES[strategy].splits


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
    if not overwrite:
        refuse_clobbering(output_dir, ("comparison.json", *strategies), "a comparison",
                          "give --overwrite to replace it, or another --output-dir.")  # fmt: skip
    configs = {
        s: dataclasses.replace(config, strategy=s, output_dir=str(output_dir / s)).validate() for s in strategies
    }
    results: dict[str, RunResult] = {}
    for strategy, one in configs.items():
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
    write_json_atomic(output_dir / "comparison.json", summary)
    summary["plot"] = str(plot_comparison(results, target, output_dir / "comparison.png"))
    return summary


def plot_comparison(results: dict[str, RunResult], target: float, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for strategy, result in results.items():
        evaluated = [m for m in result.metrics if m["val_ppl"] is not None]
        style = "--" if whole_model(strategy) else "-"
        for ax, key in ((axes[0], "round"), (axes[1], "sim_time_s")):
            ax.plot([m[key] for m in evaluated], [m["val_ppl"] for m in evaluated], style, marker="o", label=strategy)
    for ax, label in ((axes[0], "round"), (axes[1], "simulated time (s)")):
        ax.axhline(target, color="grey", linewidth=0.8, linestyle=":", label=f"target {target:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel("validation perplexity")
        ax.grid(alpha=0.3)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    figure.suptitle("Strategies on identical data, budgets and seed (dashed: whole model on every client, "
                    "not limited by the budgets)", fontsize=10)  # fmt: skip
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
