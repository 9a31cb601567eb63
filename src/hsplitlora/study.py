"""The reproduction study (method.md section 9 at small scale): every strategy on identical data,
seeds and sample counts, under heterogeneous budgets and a homogeneous setting with the same total
budget; several seeds for the main methods; E2E metrics on a fixed test subset; tables and plots.

    python benchmarks/reproduce.py            # SmolLM2-135M, about 1.8 hours on 2 cores
    python benchmarks/reproduce.py --quick    # the tiny model, the same code path, about 5 minutes

Finished runs are reused when their folder holds the same configuration, so an interrupted study
continues where it stopped."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hsplitlora.config import ALL_TARGETS, RunConfig
from hsplitlora.method.planner import parse_bytes
from hsplitlora.reporting import write_json_atomic

ALL_STRATEGIES = ("hsplitlora", "splitlora", "hetlora", "fedlora", "cenlora", "ft", "no-iwi", "no-armsc", "no-naa")
MAIN = ("hsplitlora", "splitlora", "hetlora")  # several seeds each
# The whole model on every client (or one central trainer): budgets change nothing, so the
# homogeneous setting reuses their heterogeneous runs.
BUDGET_FREE = ("fedlora", "cenlora", "ft")
SENT_KEYS = ("bytes_activations", "bytes_gradients", "bytes_adapters_up", "bytes_adapters_down")
TABLES_START, TABLES_END = "<!-- study-tables:start -->", "<!-- study-tables:end -->"


@dataclass(frozen=True)
class StudySpec:
    model: str
    budgets: tuple[str, ...]  # heterogeneous client budgets; the homogeneous setting splits their sum evenly
    gflops: tuple[float, ...]  # heterogeneous compute per client (the homogeneous one gets their mean)
    mbps: tuple[float, ...]  # heterogeneous link per client
    rounds: int
    local_steps: int
    batch_size: int
    max_seq_len: int
    val_size: int
    seeds: int
    eval_mrs: int  # E2E metrics on the first N test MRs of testset_w_refs.csv
    beams: int
    max_new_tokens: int
    targets: tuple[str, ...] = ALL_TARGETS
    rank_levels: tuple[int, ...] = (0, 2, 4, 8, 16, 32)
    rho: float = 0.05
    homo_strategies: tuple[str, ...] = MAIN  # budget-free strategies are shared with the heterogeneous setting
    homo_seeds: int = 1
    extra: dict = field(default_factory=dict)


FULL = StudySpec(
    model="smollm2-135m",
    budgets=("200MB", "250MB", "350MB", "500MB", "700MB"),
    gflops=(50, 100, 200, 400, 800),
    mbps=(20, 50, 100, 200, 500),
    rounds=6,
    local_steps=2,
    batch_size=4,
    max_seq_len=96,
    val_size=48,
    seeds=3,
    eval_mrs=20,
    beams=10,
    max_new_tokens=64,
)
QUICK = dataclasses.replace(
    FULL,
    model="tiny",
    budgets=("6MB", "7MB", "9MB", "12MB", "20MB"),  # the weakest holds SplitLoRA's cut at a positive rank
    rounds=2,
    local_steps=2,
    batch_size=4,
    max_seq_len=256,
    val_size=8,
    seeds=2,
    eval_mrs=2,
    beams=2,
    max_new_tokens=6,
)


def setting_budgets(spec: StudySpec, setting: str) -> list[int]:
    budgets = [parse_bytes(b) for b in spec.budgets]
    if setting == "hetero":
        return budgets
    return [sum(budgets) // len(budgets)] * len(budgets)


def run_config(spec: StudySpec, setting: str, strategy: str, seed: int, output_dir: Path) -> RunConfig:
    clients = len(spec.budgets)
    if setting == "hetero":
        speeds = list(zip(spec.gflops, spec.mbps, strict=True))
    else:
        speeds = [(statistics.mean(spec.gflops), statistics.mean(spec.mbps))] * clients
    devices = {i: {"flops": g * 1e9, "bandwidth": m * 1e6 / 8} for i, (g, m) in enumerate(speeds)}
    return RunConfig(
        model=spec.model, strategy=strategy, clients=clients, rounds=spec.rounds, local_steps=spec.local_steps,
        budgets=[str(b) for b in setting_budgets(spec, setting)], devices=devices,
        targets=list(spec.targets), rank_levels=list(spec.rank_levels), rho=spec.rho,
        batch_size=spec.batch_size, max_seq_len=spec.max_seq_len, val_size=spec.val_size,
        seed=seed, output_dir=str(output_dir), **spec.extra,
    ).validate()  # fmt: skip


def planned_runs(spec: StudySpec) -> list[tuple[str, str, int]]:
    """(setting, strategy, seed) of every run, seed 0 of each strategy first."""
    runs = [("hetero", s, 0) for s in ALL_STRATEGIES]
    runs += [("homo", s, 0) for s in spec.homo_strategies if s not in BUDGET_FREE]
    for seed in range(1, spec.seeds):
        runs += [("hetero", s, seed) for s in MAIN]
        runs += [("homo", s, seed) for s in MAIN if s in spec.homo_strategies and seed < spec.homo_seeds]
    return runs


def _same_config(run_dir: Path, config: RunConfig) -> bool:
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    wanted = json.loads(json.dumps(dataclasses.asdict(config)))
    return all(saved.get(key) == value for key, value in wanted.items())


def _run_one(config: RunConfig, log) -> None:
    from hsplitlora.rounds import Reporter, run

    class Progress(Reporter):
        def round_finished(self, line: dict) -> None:
            ppl = "-" if line["val_ppl"] is None else f"{line['val_ppl']:.3f}"
            log(f"    round {line['round']}: val ppl {ppl}, simulated {line['sim_time_s']:.1f} s, "
                f"wall {line['wall_time_s']:.0f} s")  # fmt: skip

    run(config, reporter=Progress(), log=lambda message: None)


def _evaluate(run_dir: Path, spec: StudySpec) -> dict:
    from hsplitlora.evaluation.generation import GenerationSettings
    from hsplitlora.evaluation.run_eval import evaluate_run

    settings = GenerationSettings(num_beams=spec.beams, max_new_tokens=spec.max_new_tokens)
    path = run_dir / "eval.json"
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("mrs") == spec.eval_mrs and saved.get("generation") == vars(settings):
            return saved
    return evaluate_run(run_dir, limit=spec.eval_mrs, settings=settings)


def _collect(run_dir: Path, setting: str, strategy: str, seed: int, clients: int) -> dict:
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    summary = json.loads((run_dir / "summary.json").read_text())
    per_client = [0] * clients
    for line in metrics:
        for entry in line["clients"]:
            sent = sum(entry.get(k, 0) for k in SENT_KEYS)
            if entry["client"] < clients:
                per_client[entry["client"]] += sent
    last = metrics[-1]["clients"]
    return {
        "setting": setting,
        "strategy": strategy,
        "seed": seed,
        "final_val_ppl": summary["final_val_ppl"],
        "sim_time_s": summary["sim_time_s"],
        "wall_time_s": summary["wall_time_s"],
        "bytes_per_client": per_client,
        "peak_client_bytes": summary["peak_client_predicted_bytes"],
        "split_points": [c["split_point"] for c in last],
        "client_rank_totals": [c["client_rank_total"] for c in last],
        "curve": [
            {
                "round": m["round"],
                "sim_time_s": m["sim_time_s"],
                "wall_time_s": m["wall_time_s"],
                "val_ppl": m["val_ppl"],
            }
            for m in metrics
            if m["val_ppl"] is not None
        ],  # fmt: skip
    }


def run_study(spec: StudySpec, out_dir: Path, results_dir: Path, log=print) -> dict:
    """Run (or reuse) every planned run, evaluate seed 0 of each, write results.json and plots."""
    out_dir, results_dir = Path(out_dir), Path(results_dir)
    runs = planned_runs(spec)
    collected = []
    for index, (setting, strategy, seed) in enumerate(runs, 1):
        run_dir = out_dir / setting / strategy / f"seed{seed}"
        config = run_config(spec, setting, strategy, seed, run_dir)
        done = (run_dir / "summary.json").is_file() and _same_config(run_dir, config)
        log(f"[{index}/{len(runs)}] {setting} {strategy} seed {seed}" + (" (reused)" if done else ""))
        if not done:
            _run_one(config, log)
        record = _collect(run_dir, setting, strategy, seed, len(spec.budgets))
        if seed == 0:
            log(f"    E2E generation on {spec.eval_mrs} test MRs (beam {spec.beams})")
            evaluation = _evaluate(run_dir, spec)
            record["e2e"] = evaluation["metrics"]
            record["test_ppl"] = evaluation["perplexity"]
        collected.append(record)
    results = {
        "spec": dataclasses.asdict(spec),
        "budgets_bytes": {s: setting_budgets(spec, s) for s in ("hetero", "homo")},
        "machine": machine(),
        "command": "python benchmarks/reproduce.py" + (" --quick" if spec.model == QUICK.model else ""),
        "runs": collected,
    }
    results["targets"] = {s: target_ppl(results, s) for s in ("hetero", "homo")}
    results_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(results_dir / "results.json", results)
    plot_study(results, results_dir)
    return results


def machine() -> dict:
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


# -- aggregation of the runs into tables --------------------------------------------------------------
def runs_of(results: dict, setting: str, strategy: str) -> list[dict]:
    """The runs of a strategy in a setting; budget-free strategies borrow their heterogeneous runs."""
    source = "hetero" if strategy in BUDGET_FREE else setting
    return [r for r in results["runs"] if r["setting"] == source and r["strategy"] == strategy]


def strategies_in(results: dict, setting: str) -> list[str]:
    return [s for s in ALL_STRATEGIES if runs_of(results, setting, s)]


def target_ppl(results: dict, setting: str) -> float:
    """The worst mean final perplexity among the main methods: all three reach it on average."""
    means = [statistics.mean(r["final_val_ppl"] for r in runs_of(results, setting, s)) for s in MAIN]
    return max(means)


def time_to(curve: list[dict], target: float, key: str) -> float | None:
    for point in curve:
        if point["val_ppl"] <= target:
            return point[key]
    return None


def spread(values: list[float]) -> float:
    """Sample standard deviation (0 for one value); NaN-tolerant, unlike statistics.stdev."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean_spread(values: list[float], digits: int) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{sum(values) / len(values):.{digits}f} ± {spread(values):.{digits}f}"


def _times(runs: list[dict], target: float, key: str) -> str:
    times = [time_to(r["curve"], target, key) for r in runs]
    reached = [t for t in times if t is not None]
    if not reached:
        return "not reached"
    text = _mean_spread(reached, 1)
    return text if len(reached) == len(times) else f"{text} ({len(reached)}/{len(times)} seeds)"


def tables_markdown(results: dict) -> str:
    """The document's tables, rendered from results.json alone."""
    lines = []
    metrics = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
    spec = results["spec"]
    for setting, title in (("hetero", "Heterogeneous"), ("homo", "Homogeneous")):
        budgets = ", ".join(f"{b:,}" for b in results["budgets_bytes"][setting])
        target = results["targets"][setting]
        lines += [
            f"### {title} devices (budgets in bytes: {budgets})",
            "",
            f"Target perplexity for the time columns: {target:.3f} (the worst mean final perplexity of "
            "hsplitlora, splitlora and hetlora in this setting).",
            "",
            "| strategy | seeds | final val ppl | simulated s to target | wall s to target | MB sent per client "
            "(mean / max) | peak client memory (MB) | split points | client ranks (sum) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for strategy in strategies_in(results, setting):
            runs = runs_of(results, setting, strategy)
            first = runs[0]
            sent = [statistics.mean(r["bytes_per_client"]) / 1e6 for r in runs]
            most = max(max(r["bytes_per_client"]) for r in runs) / 1e6
            whole = " *" if strategy in BUDGET_FREE else ""
            lines.append(
                f"| {strategy} | {len(runs)} | {_mean_spread([r['final_val_ppl'] for r in runs], 3)} "
                f"| {_times(runs, target, 'sim_time_s')} | {_times(runs, target, 'wall_time_s')} "
                f"| {statistics.mean(sent):.1f} / {most:.1f} | {first['peak_client_bytes'] / 1e6:.1f}{whole} "
                f"| {', '.join(map(str, first['split_points']))} | {', '.join(map(str, first['client_rank_totals']))} |"
            )
        lines += ["", f"E2E metrics of seed 0 on the first {spec['eval_mrs']} test MRs "
                  f"(beam {spec['beams']}), with test perplexity on their references:", "",
                  "| strategy | test ppl | " + " | ".join(metrics) + " |",
                  "|---|---|" + "---|" * len(metrics)]  # fmt: skip
        for strategy in strategies_in(results, setting):
            first = next(r for r in runs_of(results, setting, strategy) if r["seed"] == 0)
            values = " | ".join(f"{first['e2e'][m]:.4f}" for m in metrics)
            lines.append(f"| {strategy} | {first['test_ppl']:.3f} | {values} |")
        lines.append("")
    lines.append("\\* the whole model on every client (or one central trainer): memory is reported, not limited "
                 "by the budgets; these runs do not depend on the budgets and appear in both settings.")  # fmt: skip
    return "\n".join(lines) + "\n"


def replace_tables(document: str, tables: str) -> str:
    start, end = document.index(TABLES_START), document.index(TABLES_END)
    return document[: start + len(TABLES_START)] + "\n" + tables + document[end:]


def tables_in(document: str) -> str:
    start, end = document.index(TABLES_START), document.index(TABLES_END)
    return document[start + len(TABLES_START) + 1 : end]


# -- plots ----------------------------------------------------------------------------------------------
def _mean_curve(runs: list[dict], key: str) -> tuple[list[float], list[float]]:
    length = min(len(r["curve"]) for r in runs)
    xs = [statistics.mean(r["curve"][i][key] for r in runs) for i in range(length)]
    ys = [statistics.mean(r["curve"][i]["val_ppl"] for r in runs) for i in range(length)]
    return xs, ys


def plot_study(results: dict, results_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, name in (("sim_time_s", "simulated time (s)", "ppl_vs_simulated_time.png"),
                             ("wall_time_s", "measured wall time (s)", "ppl_vs_wall_time.png")):  # fmt: skip
        figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
        for ax, setting, title in ((axes[0], "hetero", "heterogeneous"), (axes[1], "homo", "homogeneous")):
            for strategy in strategies_in(results, setting):
                runs = runs_of(results, setting, strategy)
                xs, ys = _mean_curve(runs, key)
                style = "--" if strategy in BUDGET_FREE else (":" if strategy.startswith("no-") else "-")
                suffix = f" (mean of {len(runs)})" if len(runs) > 1 else ""
                color = f"C{ALL_STRATEGIES.index(strategy)}"  # one colour per strategy in both panels
                ax.plot(xs, ys, style, color=color, marker="o", markersize=3, label=strategy + suffix)
            ax.axhline(results["targets"][setting], color="grey", linewidth=0.8, linestyle=":")
            ax.set_title(f"{title} devices")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("validation perplexity")
        axes[1].legend(*axes[0].get_legend_handles_labels(), fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
        figure.suptitle(f"{results['spec']['model']}, E2E, 5 clients: validation perplexity per round "
                        "(grey: target perplexity)", fontsize=10)  # fmt: skip
        figure.tight_layout()
        figure.savefig(results_dir / name, dpi=110)
        plt.close(figure)
        paths.append(results_dir / name)

    figure, axes = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for ax, setting, title in ((axes[0], "hetero", "heterogeneous"), (axes[1], "homo", "homogeneous")):
        names = strategies_in(results, setting)
        finals = [[r["final_val_ppl"] for r in runs_of(results, setting, s)] for s in names]
        means = [statistics.mean(f) for f in finals]
        spreads = [spread(f) for f in finals]
        ax.bar(names, means, yerr=spreads, capsize=4, color=["C0" if s in MAIN else "C7" for s in names])
        low = min(means) - 3 * max(spreads + [0.05])
        ax.set_ylim(max(0.0, low), max(m + s for m, s in zip(means, spreads, strict=True)) * 1.02)
        ax.set_title(f"{title} devices: final validation perplexity (mean ± std over seeds)")
        ax.tick_params(axis="x", rotation=45)
        ax.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(results_dir / "final_ppl.png", dpi=110)
    plt.close(figure)
    paths.append(results_dir / "final_ppl.png")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="reproduce.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny model and 2 rounds: the CI smoke run")
    parser.add_argument("--out", default=None, help="run folders (runs/study or runs/study-quick)")
    parser.add_argument("--results", default=None, help="results.json and plots (docs/results, or --out for --quick)")
    parser.add_argument("--doc", default=None, help="rewrite the tables of this markdown file (docs/results.md)")
    args = parser.parse_args(argv)
    spec = QUICK if args.quick else FULL
    out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    results_dir = Path(args.results or (out if args.quick else "docs/results"))
    started = time.perf_counter()
    results = run_study(spec, out, results_dir, log=lambda message: print(message, file=sys.stderr, flush=True))
    tables = tables_markdown(results)
    (results_dir / "tables.md").write_text(tables)
    if args.doc:
        path = Path(args.doc)
        path.write_text(replace_tables(path.read_text(), tables))
    print(tables)
    print(f"results: {results_dir}/results.json, plots in {results_dir}; {time.perf_counter() - started:.0f} s")
    return 0
