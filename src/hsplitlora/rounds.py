"""The round loop, one direction per round: (re)plan -> E local split steps per client ->
importance -> aggregation at the fed server -> merge -> evaluation -> log and checkpoint.

    from hsplitlora.config import RunConfig
    from hsplitlora.rounds import run
    result = run(RunConfig(model="tiny", rounds=2, local_steps=3))
    result.metrics[-1]["val_ppl"], result.run_dir
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

from hsplitlora.checks import check
from hsplitlora.config import INPROCESS, RunConfig, config_fields
from hsplitlora.data.fingerprint import check_fingerprints, fingerprints
from hsplitlora.errors import UsageError, check_regular_file
from hsplitlora.evaluation.perplexity import perplexity
from hsplitlora.folders import check_output_name
from hsplitlora.lora.attach import Candidate
from hsplitlora.method.importance import (
    SmoothedImportance,
    average_importance,
    importance,
    kendall_tau_distance,
)
from hsplitlora.method.planner import InfeasibleClientError, Plan
from hsplitlora.method.sampling import per_round
from hsplitlora.models.loading import LoadedModel
from hsplitlora.placement import placement
from hsplitlora.privacy.dp import client_epsilons
from hsplitlora.privacy.floor import leakage_at, read_curve
from hsplitlora.reporting import (
    RunFolder,
    check_run_folder,
    holds_run,
    read_json,
    write_json_atomic,
    write_tensors_atomic,
)
from hsplitlora.resources import check_fits, simulation_bytes
from hsplitlora.roles.fed_server import NonFiniteUpdate
from hsplitlora.roles.messages import RoundPlan
from hsplitlora.round_record import mean_present, round_line, run_summary
from hsplitlora.setup import Setup, build_setup
from hsplitlora.strategies import Strategy
from hsplitlora.time_model import ClientRoundWork, round_time


@dataclass
class RunResult:
    run_dir: Path
    metrics: list[dict]
    summary: dict
    plots: list[Path] = field(default_factory=list)


def default_output_dir(strategy: str) -> Path:
    """runs/<time>-<strategy>, with a counter if a run of the same second holds that name."""
    base = Path("runs") / f"{datetime.now().strftime('%Y%m%d-%H%M%S')}-{strategy}"
    path, number = base, 1
    while path.exists():
        number += 1
        path = base.with_name(f"{base.name}-{number}")
    return path


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def candidate_weights(model: torch.nn.Module, candidates: dict[str, Candidate]) -> dict[str, torch.Tensor]:
    """The current (merged) weight of every candidate."""
    return {
        name: model.get_submodule(c.module).weight(c.slot).detach().clone().contiguous()
        for name, c in candidates.items()
    }


class Reporter:
    """What the loop tells a person: plain-callable hooks (the CLI draws progress with rich)."""

    def engine_ready(self, engine) -> None: ...
    def round_started(self, round_: int, rounds: int, plan: Plan, replanned: bool) -> None: ...
    def step(self, round_: int, step: int, losses: list[float]) -> None: ...
    def round_finished(self, line: dict) -> None: ...


def resume_config(run_dir: str | Path, rounds: int | None = None) -> RunConfig:
    """The config a run folder was started with, with more rounds if `rounds` is given (it must be
    more than the rounds the run has finished)."""
    folder = RunFolder(run_dir)
    path = folder.path / "config.json"
    if not path.is_file() or folder.checkpoint_folder() is None:
        raise UsageError(f"cannot resume {run_dir}: it holds no config.json and checkpoint of a started run.")
    if not holds_run(run_dir):
        raise UsageError(f"cannot resume {run_dir}: no manifest of hsplitlora says it is a run, and it lacks the "
                         "metrics.jsonl an earlier run writes.")  # fmt: skip
    values = read_json(path, "run config")
    resolved = values.pop("resolved", None)
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise UsageError(
            f"run config {path} has the setting {unknown[0]!r}, which this version of hsplitlora does not know "
            "(the run was written by another version); resume it with that version."
        )
    done = folder.checkpoint_state().get("round")
    if not isinstance(done, int) or isinstance(done, bool) or done < 1:
        raise UsageError(f"the checkpoint state in {folder.checkpoint_folder()} names no finished round (damaged).")
    if rounds is not None and rounds <= done:
        raise UsageError(f"{run_dir} has finished {done} rounds; --rounds {rounds} must be above {done} to extend it.")
    if rounds is None and isinstance(values.get("rounds"), int) and done >= values["rounds"]:
        raise UsageError(
            f"{run_dir} has finished all {done} of its rounds; give --rounds N with N above {done} to extend it."
        )
    check_fingerprints(resolved.get("data_files") if isinstance(resolved, dict) else None, "resume")
    values["output_dir"] = str(run_dir)
    if rounds is not None:
        values["rounds"] = rounds
    return RunConfig(**values).validate()


def prepare_paths(config: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Resolve the paths a run stores (so that eval and resume work from any directory) and check
    the run folder before anything is computed: not a file, writable, and holding no other run
    unless `overwrite` (or `resume`) says so. Returns the run folder."""
    for path in (config.data if config.data != "e2e" else None, config.val_data):
        if path is not None and not Path(path).is_dir():  # named as given, before a link is resolved away
            check_regular_file(path, "data file")
    for name in ("data_dir", "val_data", "client_data"):
        if getattr(config, name) is not None:
            setattr(config, name, str(Path(getattr(config, name)).resolve()))
    if config.data != "e2e":
        config.data = str(Path(config.data).resolve())
    if Path(config.model).is_dir():
        config.model = str(Path(config.model).resolve())
    check_output_name(config.output_dir, "--output-dir", "runs/<time>-<strategy>")
    output = Path(config.output_dir) if config.output_dir else default_output_dir(config.strategy)
    check_run_folder(output, resume, overwrite)
    config.output_dir = str(output)
    return output


def run(
    config: RunConfig,
    loaded: LoadedModel | None = None,
    reporter: Reporter | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Run `config.rounds` rounds of `config.strategy`; returns the metrics and the run folder.
    With `resume`, continue the run in `config.output_dir` from its last checkpoint; `overwrite`
    replaces a run already in that folder (otherwise refused)."""
    check(config)
    prepare_paths(config, resume, overwrite)
    where = placement(config.device, config.client_device, config.server_device)
    reporter = reporter or Reporter()
    log = log or (lambda message: None)
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    started = time.perf_counter()

    setup = build_setup(config, where, loaded)
    engine = setup.engine
    reporter.engine_ready(engine)
    setup.started = started
    try:
        return _run_rounds(setup, reporter, log, resume, overwrite)
    finally:
        engine.shutdown()


def _run_rounds(
    setup: Setup, reporter: Reporter, log: Callable[[str], None], resume: bool, overwrite: bool = False
) -> RunResult:
    loop = _Loop(setup, reporter, log)
    if resume:
        loop.resume()
    else:
        loop.start(overwrite)
    for round_ in range(loop.start_round, setup.config.rounds + 1):
        loop.run_round(round_)
    return loop.finish()


class _Loop:
    """One run between rounds: the plan, the importance and its history, the metrics and the
    simulated clock; and the steps of a round, in order."""

    def __init__(self, setup: Setup, reporter: Reporter, log: Callable[[str], None]):
        self.setup, self.reporter, self.log = setup, reporter, log
        self.config, self.engine, self.strategy = setup.config, setup.engine, setup.strategy
        self.smoothed = SmoothedImportance(self.config.gamma_max, self.config.tau)
        self.folder = RunFolder(self.config.output_dir)
        self.current: dict[str, float] | None = None
        self.importance_history: list[dict] = []  # per round: measured Theta_t and smoothed I_t
        self.metrics: list[dict] = []
        self.sim_time, self.wall_offset, self.start_round = 0.0, 0.0, 1
        self.plan: Plan | None = None
        self.first_plan = False
        self.sampled: list[int] | None = None  # this round's training clients (None: every one)

    def _messages(self, round_: int, plan_clients) -> list[RoundPlan]:
        return self.strategy.round_plans(plan_clients, round_, self.config.tail)

    def resume(self) -> None:
        """Every role, the plan, the importance and the clock as the last checkpoint left them."""
        config, strategy, folder = self.config, self.strategy, self.folder
        state, tensors = folder.load_checkpoint()
        try:
            saved = Plan.from_state(state["plan"]).clients
            if sorted(c.client for c in saved) != list(range(len(saved))) or len(saved) > len(self.setup.shards):
                raise ValueError("the plan's clients differ from the config's")
            self.engine.load_state(state, tensors, self._messages(state["round"], saved))
        except (KeyError, ValueError, TypeError, RuntimeError, IndexError) as error:
            raise UsageError(
                f"the checkpoint in {folder.path} does not fit the run's config.json (edited since the run, or "
                f"damaged: {error.__class__.__name__}); restore config.json or start a new run."
            ) from None
        written = read_json(folder.path / "config.json", "run config")
        if written.get("rounds") != config.rounds:  # an extension sticks: a later --resume goes on to it
            folder.write_config({**written, "rounds": config.rounds})
        strategy.importance_at_last_plan = state["importance_at_last_plan"]
        strategy.resume_cuts([c.split_point for c in sorted(saved, key=lambda c: c.client)])
        smoothed = self.smoothed
        smoothed.round, smoothed.value, smoothed.gamma = (state["smoothing"][k] for k in ("round", "value", "gamma"))
        self.plan = Plan.from_state(state["plan"])
        self.current = state["importance"]
        self.importance_history = state["importance_history"]
        self.start_round, self.sim_time, self.wall_offset = (
            state["round"] + 1,
            state["sim_time_s"],
            state["wall_time_s"],
        )
        self.metrics = [m for m in folder.read_metrics() if m["round"] <= state["round"]]
        folder.rewrite_metrics(self.metrics)  # drop a line written after the checkpoint by a crashed run
        self.log(f"resuming {folder.path} after round {state['round']}")

    def start(self, overwrite: bool) -> None:
        """Round 1's importance (a warm-up pass of one batch per client on the frozen model) and
        the first plan, before anything is written: an impossible budget stops the run here."""
        setup, config, strategy = self.setup, self.config, self.strategy
        if strategy.warms_up():
            # Round 1's sampled clients warm up, as later rounds' importance comes from those sampled:
            # with 100 clients and 10 a round, a warm-up step of all 100 would cost 10 rounds' steps.
            warm = self._sample(self.start_round)
            self.engine.sample(warm)
            reports = self.engine.warmup_importance()
            chosen = range(len(reports)) if warm is None else warm
            per_client = [importance(*reports[cid], setup.memory, config.r_ref) for cid in chosen]
            sizes = [len(setup.shards[cid]) for cid in chosen]
            self.current = self.smoothed.update(average_importance(per_client, sizes))
            self.importance_history.append({"round": 0, "smoothed": self.current})
        try:
            self.plan = strategy.make_plan(self.current)
        except InfeasibleClientError as error:
            floor = next((note for note in setup.notes if note.startswith("privacy floor")), None)
            if floor is None:
                raise
            raise InfeasibleClientError(f"{error} The cut it needs is the {floor}") from None
        self.first_plan = True
        if config.leakage_curve is not None and strategy.crosses_cut():
            curve = read_curve(config.leakage_curve, config.model, config.split_mode)
            self.log("measured leakage at each client's cut: " + ", ".join(
                f"client {c.client} cut {c.split_point}: {leakage_at(curve, c.split_point):.3f}"
                for c in self.plan.clients))  # fmt: skip
        warn_over_budget(self.plan, strategy, self.log)
        if config.engine == INPROCESS:
            remedy = "lower batch_size or max_seq_len, use fewer clients, or --engine ray on several machines."
            check_fits(simulation_bytes(setup.memory, self.plan), "simulating every client in this process", remedy)
        if overwrite:
            self.folder.clear()
        self.folder.write_config({**config.to_dict(), "resolved": {
            "devices": [d.to_dict() for d in setup.devices], "server_budget_bytes": setup.server_budget,
            "shard_sizes": [len(s) for s in setup.shards], "num_blocks": setup.num_blocks,
            "memory_model": setup.memory.to_dict(), "candidates": len(setup.candidates),
            "data": setup.data_description, "data_notes": setup.notes, "data_files": fingerprints(config),
        }})  # fmt: skip
        self.folder.rewrite_metrics([])
        self.log(f"run folder: {self.folder.path}")
        for note in setup.notes:
            self.log(note)
        own_data = config.data != "e2e" or config.client_data is not None
        if own_data and strategy.crosses_cut() and config.split_mode == "standard":
            self.log("standard split: the main server receives the labels, the response text of every training "
                     "example (docs/security.md); --split-mode u keeps them on the client.")  # fmt: skip
        shared = "one file per client" if config.client_data is not None else f"{config.partition} partition"
        self.log(f"{shared}, samples per client: {[len(s) for s in setup.shards]}")

    def run_round(self, round_: int) -> None:
        """Plan, configure, E local steps, importance, aggregate, evaluate, record and checkpoint."""
        round_started = time.perf_counter()
        strategy, engine = self.strategy, self.engine
        distance = kendall_tau_distance(self.current, strategy.importance_at_last_plan) if (
            self.current and strategy.importance_at_last_plan) else None  # fmt: skip
        replanned = self.first_plan or strategy.wants_replan(round_, self.current)
        if replanned and not self.first_plan:
            self.plan = strategy.make_plan(self.current)
        self.first_plan = False
        history = self._train(round_, replanned)
        if strategy.measures_importance():
            self._update_importance(round_)
        tokens = [counters["tokens"] for counters in engine.round_counters()]
        step_traffic = {cid: engine.step_bytes(cid) for cid in engine.traffic}
        if strategy.aggregates():
            try:
                engine.aggregate(round_)
            except NonFiniteUpdate as error:
                raise TrainingDiverged(
                    f"{error} at round {round_}; {_stopped(round_, self.folder, 'lr or alpha')}"
                ) from None
        val_loss, val_ppl = self._evaluate(round_)
        timing = self._time(tokens, step_traffic)
        now = time.perf_counter()
        line = round_line(
            self.config, round_, self.plan, history, engine, timing,
            losses={"train_loss": mean_present([loss for losses in history for loss in losses]),
                    "val_loss": val_loss, "val_ppl": val_ppl},
            times={"sim_time_s": self.sim_time, "wall_time_s": self.wall_offset + now - self.setup.started,
                   "round_wall_time_s": now - round_started},
            planning={"replanned": replanned, "kendall_distance": distance,
                      "smoothing_gamma": self.smoothed.gamma if strategy.measures_importance() else None},
            sampled=self.sampled if self.config.clients_per_round is not None else None,
        )  # fmt: skip
        self.metrics.append(line)
        self.folder.append_metrics(line)
        self.engine.events = []  # reported; what happens from here on goes into the next round's line
        self._checkpoint(round_, line)
        self.reporter.round_finished(line)

    def _train(self, round_: int, replanned: bool) -> list[list[float | None]]:
        engine, plan, folder = self.engine, self.plan, self.folder
        engine.reset_traffic()
        self.sampled = self._sample(round_)
        engine.sample(self.sampled)
        engine.configure(self._messages(round_, plan.clients))
        engine.measure_importance(self.strategy.measures_importance())
        self.reporter.round_started(round_, self.config.rounds, plan, replanned)

        def on_step(step: int, losses: list[float]) -> None:
            _check_finite(round_, step, losses, plan, folder)
            self.reporter.step(round_, step, losses)

        return engine.local_steps(self.setup.steps_per_round, on_step)

    def _sample(self, round_: int) -> list[int] | None:
        """The round's training clients as the strategy draws them (None: every client)."""
        setting, clients = self.config.clients_per_round, len(self.setup.shards)
        count = None if setting is None else per_round(setting, clients)
        return self.strategy.sample(self.config.seed, round_, clients, count)

    def _update_importance(self, round_: int) -> None:
        reports = self.engine.importance_reports()
        theta = average_importance(
            [importance(sums, batches, self.setup.memory, self.config.r_ref) for sums, batches, _ in reports],
            [samples for _, _, samples in reports],
        )
        self.current = self.smoothed.update(theta)
        self.importance_history.append({"round": round_, "measured": theta, "smoothed": self.current})

    def _evaluate(self, round_: int) -> tuple[float | None, float | None]:
        config = self.config
        if round_ % config.eval_every != 0 and round_ != config.rounds:
            return None, None
        val_loss = self.engine.validation_loss(self.setup.val_batches, self.strategy.validation_client(self.plan))
        if not math.isfinite(val_loss):
            stopped = _stopped(round_, self.folder, "lr or alpha")
            raise TrainingDiverged(f"the validation loss became {val_loss} after round {round_}; {stopped}")
        return val_loss, perplexity(val_loss)

    def _time(self, tokens: list[int], step_traffic: dict[int, int]) -> dict:
        """The round's simulated time under the time model, over the sampled clients (the main
        server is shared by them alone); advances the clock. A client not sampled has no time (None):
        it only takes the update, which does not hold up the round."""
        traffic, setup = self.engine.traffic, self.setup
        trained = [c for c in self.plan.clients if self.sampled is None or c.client in self.sampled]
        work = [ClientRoundWork(tokens[c.client], step_traffic[c.client],
                                traffic[c.client]["adapters_up"] + traffic[c.client]["adapters_down"])
                for c in trained]  # fmt: skip
        timing = round_time(setup.memory, trained, [setup.devices[c.client] for c in trained], work,
                            self.config.server_flops, setup.model.config.vocab_size, setup.hidden_size)  # fmt: skip
        if self.sampled is not None:
            seconds = dict(zip([c.client for c in trained], timing["client_s"], strict=True))
            timing["client_s"] = [seconds.get(c.client) for c in self.plan.clients]
        self.sim_time += timing["round_s"]
        return timing

    def _checkpoint(self, round_: int, line: dict) -> None:
        strategy, smoothed = self.strategy, self.smoothed
        role_state, tensors = self.engine.state()
        self.folder.save_checkpoint(
            {"round": round_, "strategy": strategy.name, "plan": self.plan.to_state(), "importance": self.current,
             "importance_history": self.importance_history,
             "importance_at_last_plan": strategy.importance_at_last_plan,
             "smoothing": {"round": smoothed.round, "value": smoothed.value, "gamma": smoothed.gamma},
             "sim_time_s": self.sim_time, "wall_time_s": line["wall_time_s"], **role_state},
            tensors,
        )  # fmt: skip

    def finish(self) -> RunResult:
        """The final model (with the validation client's adapters folded in), summary and plots."""
        strategy, config, folder = self.strategy, self.config, self.folder
        final = self.engine.export_weights(strategy.validation_client(self.plan))
        folder.record("model.safetensors", "summary.json")
        write_tensors_atomic(folder.path / "model.safetensors", final,
                             {"model": config.model, "format": strategy.export_format()})  # fmt: skip
        summary = run_summary(config, self.metrics, self.sim_time, self.setup.data_description)
        dp = self.setup.dp
        if dp.activations or dp.sgd:
            shard_sizes = [len(shard) for shard in self.setup.shards]
            rows = client_epsilons(config, dp, shard_sizes, self.engine.round_counters())
            summary["privacy"] = {"dp": dp.to_dict(), "accountant": "opacus RDP", "clients": rows}
            for row in rows:
                spent = [f"{kind} epsilon {row[kind]['epsilon']:.3g} over {row[kind]['steps']} steps"
                         for kind in ("activations", "sgd") if kind in row]  # fmt: skip
                self.log(f"client {row['client']}: " + ", ".join(spent) + f" (delta {row['delta']:.2g})")
        write_json_atomic(folder.path / "summary.json", summary)
        plots = folder.plot(self.metrics)
        return RunResult(folder.path, self.metrics, summary, plots)


def warn_over_budget(plan: Plan, strategy: Strategy, log: Callable[[str], None]) -> None:
    """A fixed cut or rank (or the paper's SplitLoRA rule, which sees only the weakest client's
    budget) runs as given, but a plan a device or the main server could not hold is said aloud
    (budgets limit only a split client's memory, and the main server's per-client share)."""
    from hsplitlora.units import format_bytes

    if not strategy.crosses_cut():
        return
    share = plan.server_share_bytes
    for c in plan.clients:
        if c.predicted_bytes > c.budget_bytes:
            log(
                f"warning: the fixed plan needs {format_bytes(c.predicted_bytes)} on client {c.client}, above its "
                f"budget of {format_bytes(c.budget_bytes)}; it runs as asked, but that device could not hold it."
            )
    over = [c for c in plan.clients if c.server_predicted_bytes > share]
    if over:
        log(
            f"warning: the plan needs up to {format_bytes(max(c.server_predicted_bytes for c in over))} on the main "
            f"server for client(s) {', '.join(str(c.client) for c in over)}, above the share of "
            f"{format_bytes(share)} each (the server budget over the clients that train at once); it runs as "
            "asked, but that server could not hold it."
        )


class TrainingDiverged(UsageError):
    """A non-finite loss: the run stops; the previous round's checkpoint stays as it was."""


def _check_finite(round_: int, step: int, losses: list[float | None], plan: Plan, folder: RunFolder) -> None:
    for position, loss in enumerate(losses):
        if loss is not None and not math.isfinite(loss):
            client = plan.clients[position].client
            raise TrainingDiverged(f"client {client}'s loss became {loss} at round {round_}, step {step + 1}; "
                                   f"{_stopped(round_, folder, 'lr')}")  # fmt: skip


def _stopped(round_: int, folder: RunFolder, advice: str) -> str:
    """The end of a divergence sentence: what is left to resume from, and what to try."""
    if round_ > 1:
        return (f"the run stopped and the checkpoint of round {round_ - 1} in {folder.path} is intact (try a smaller "
                f"{advice}, then --resume).")  # fmt: skip
    return f"the run stopped before any checkpoint (try a smaller {advice})."
