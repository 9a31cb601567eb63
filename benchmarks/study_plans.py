"""What each regime of the study asks of the planner, without training: for every split strategy
its round-1 plan (cuts, rank totals, peak client memory against the budget) and the round time the
time model predicts for it, and which whole-model baselines every client's budget holds.

    python benchmarks/study_plans.py --regimes v,vi      # SmolLM2-135M, about a minute on 2 cores

Importance is uniform here (a run measures it in a warm-up): the cuts are the run's (they are
chosen with uniform importance), the ranks are those of uniform importance."""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import FULL, QUICK, StudySpec, run_config  # noqa: E402  (beside this script)

SPLIT = ("hsplitlora", "hsplitlora-timed", "hsplitlora-recompute", "splitlora", "splitlora-timed",
         "splitlora-recompute", "splitlora-paper", "no-armsc", "no-iwi")  # fmt: skip
WHOLE = ("hetlora", "flora", "flexlora", "fedlora")


def compact(values: list) -> str:
    """1, 1, 1, 5 -> '1x3, 5': runs of equal values (K may be 20)."""
    parts = []
    for value, group in itertools.groupby(values):
        count = len(list(group))
        parts.append(f"{value}x{count}" if count > 1 else f"{value}")
    return ", ".join(parts)


def regime_plans(spec: StudySpec, names: list[str]) -> list[dict]:
    import torch

    from hsplitlora.data.e2e import data_file, encode, read_e2e
    from hsplitlora.devices import resolve_devices
    from hsplitlora.lora.attach import attach_lora
    from hsplitlora.method.memory import measure_memory_model
    from hsplitlora.method.sampling import per_round
    from hsplitlora.models.loading import load_model
    from hsplitlora.setup import build_strategy, expected_workload, run_memory
    from hsplitlora.units import parse_bytes

    def strategy_of(regime, label: str, folder: str):
        """The strategy as `hsplitlora run` builds it for this regime's config of `label`."""
        config = run_config(spec, regime, label, 0, Path(folder) / regime.name / label)
        devices = resolve_devices(config.clients, config.budgets, config.device_preset, config.devices)
        workload = expected_workload(config, loaded.model, items, loaded.tokenizer.pad_token_id)
        sharing = per_round(config.clients_per_round, config.clients)
        strategy = build_strategy(config, run_memory(memory, config), devices, parse_bytes(config.server_budget),
                                  config.s_min, workload, sharing if sharing < config.clients else None)  # fmt: skip
        return strategy, config

    torch.set_num_threads(1)
    loaded = load_model(spec.model)
    candidates = attach_lora(loaded.model, spec.targets)
    memory = measure_memory_model(loaded.model, candidates, spec.batch_size, spec.max_seq_len)
    examples = read_e2e(data_file(None, "train"))[:2000]
    items = [encode(e, loaded.tokenizer, spec.max_seq_len) for e in examples]
    uniform = dict.fromkeys(candidates, 1.0)
    found = []
    with tempfile.TemporaryDirectory() as folder:
        for regime in (r for r in spec.regimes if r.name in names):
            config = run_config(spec, regime, "hsplitlora", 0, Path(folder) / regime.name)
            sharing = per_round(config.clients_per_round, config.clients)
            report = {"regime": regime.name, "clients": config.clients, "sampled": sharing, "plans": {}, "whole": {}}
            for name in SPLIT:
                strategy, config = strategy_of(regime, name, folder)
                try:
                    planned = strategy.make_plan(uniform)
                except Exception as error:  # noqa: BLE001  (a regime where a strategy has no plan says why)
                    report["plans"][name] = {"error": str(error)}
                    continue
                clients = sorted(planned.clients, key=lambda c: c.client)
                report["plans"][name] = {
                    "cuts": [c.split_point for c in clients],
                    "client_ranks": [sum(c.ranks.values()) for c in clients],
                    "server_ranks": [sum(c.server_ranks.values()) for c in clients],
                    "rank32_everywhere": all(set(c.all_ranks().values()) == {32} for c in clients),
                    "peak_client_mb": max(c.predicted_bytes for c in clients) / 1e6,
                    "over_budget": [c.client for c in clients if c.predicted_bytes > c.budget_bytes],
                    "server_share_mb": strategy.server_share / 1e6,
                    "peak_server_mb": max(c.server_predicted_bytes for c in clients) / 1e6,
                    "round_s": strategy.round_time(clients),
                    "server_s": strategy.round_times(clients)[-1],
                    # The same cuts with no adapters at all: how far the cuts alone take the server.
                    "bare_server_s": strategy.round_times(
                        strategy.fixed_plan([c.split_point for c in clients], [0] * len(clients)).clients
                    )[-1],
                }
            for name in WHOLE:
                planned = strategy_of(regime, name, folder)[0].plan(uniform)
                over = [c.client for c in planned.clients if c.predicted_bytes > c.budget_bytes]
                report["whole"][name] = {"fits": not over, "over": over,
                                         "need_mb": max(c.predicted_bytes for c in planned.clients) / 1e6}  # fmt: skip
            found.append(report)
    return found


def print_report(report: dict) -> None:
    print(f"regime {report['regime']}: {report['clients']} clients, {report['sampled']} a round")
    for name, found in report["plans"].items():
        if "error" in found:
            print(f"  {name:16s} no plan: {found['error']}")
            continue
        print(f"  {name:16s} predicted round {found['round_s']:7.2f} s; cuts {compact(found['cuts'])}; client "
              f"rank sums {compact(found['client_ranks'])}; server rank sums {compact(found['server_ranks'])}; "
              f"rank 32 on every matrix: {found['rank32_everywhere']}; peak client {found['peak_client_mb']:.1f} MB"
              f"{' OVER on ' + str(found['over_budget']) if found['over_budget'] else ''}; server "
              f"{found['peak_server_mb']:.1f} of {found['server_share_mb']:.1f} MB per client")  # fmt: skip
    for name, found in report["whole"].items():
        fits = "fits" if found["fits"] else f"does not fit (clients {compact(found['over'])})"
        print(f"  {name:16s} needs {found['need_mb']:.0f} MB: {fits}")
    ours, theirs = report["plans"].get("hsplitlora", {}), report["plans"].get("splitlora", {})
    if "round_s" in ours and "round_s" in theirs:
        print(f"  predicted splitlora / hsplitlora round time: {theirs['round_s'] / ours['round_s']:.2f}x; the "
              f"main server's busy time under splitlora over hsplitlora's at its cuts with no adapters at all "
              f"(the most its cuts can gain where the server bounds the round): "
              f"{theirs['server_s'] / ours['bare_server_s']:.2f}x")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--regimes", default="v,vi", help="comma-separated regime names (default v,vi)")
    parser.add_argument("--quick", action="store_true", help="the quick study's regimes (tiny model)")
    args = parser.parse_args(argv)
    for report in regime_plans(QUICK if args.quick else FULL, args.regimes.split(",")):
        print_report(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
