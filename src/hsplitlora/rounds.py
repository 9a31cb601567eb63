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

from hsplitlora.config import RunConfig, config_fields
from hsplitlora.errors import UsageError
from hsplitlora.evaluation.perplexity import perplexity
from hsplitlora.lora.attach import Candidate
from hsplitlora.method.importance import (
    SmoothedImportance,
    average_importance,
    importance,
    kendall_tau_distance,
)
from hsplitlora.method.planner import Plan
from hsplitlora.models.loading import LoadedModel
from hsplitlora.placement import placement
from hsplitlora.reporting import (
    RUN_FILES,
    RunFolder,
    check_output_folder,
    read_json,
    refuse_clobbering,
    write_json_atomic,
    write_tensors_atomic,
)
from hsplitlora.resources import check_fits, simulation_bytes
from hsplitlora.roles.fed_server import NonFiniteUpdate
from hsplitlora.roles.messages import RoundPlan
from hsplitlora.round_record import mean_present, round_line, run_summary
from hsplitlora.setup import Setup, build_setup
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
    values = read_json(path, "run config")
    values.pop("resolved", None)
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
    values["output_dir"] = str(run_dir)
    if rounds is not None:
        values["rounds"] = rounds
    return RunConfig(**values).validate()


def prepare_paths(config: RunConfig, resume: bool = False, overwrite: bool = False) -> Path:
    """Resolve the paths a run stores (so that eval and resume work from any directory) and check
    the run folder before anything is computed: not a file, writable, and holding no other run
    unless `overwrite` (or `resume`) says so. Returns the run folder."""
    for name in ("data_dir", "val_data", "client_data"):
        if getattr(config, name) is not None:
            setattr(config, name, str(Path(getattr(config, name)).resolve()))
    if config.data != "e2e":
        config.data = str(Path(config.data).resolve())
    if Path(config.model).is_dir():
        config.model = str(Path(config.model).resolve())
    output = Path(config.output_dir) if config.output_dir else default_output_dir(config.strategy)
    check_output_folder(output, "run folder")
    if not resume and not overwrite:
        remedy = f"give --overwrite to replace it, --resume {output} to continue it, or another --output-dir."
        refuse_clobbering(output, RUN_FILES, "a run's files", remedy)
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
    config.validate()
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
    config, engine, strategy, memory, devices = setup.config, setup.engine, setup.strategy, setup.memory, setup.devices
    server_budget, shards, num_blocks, candidates = (
        setup.server_budget,
        setup.shards,
        setup.num_blocks,
        setup.candidates,
    )
    model, val_batches, fixed_ranks, started = setup.model, setup.val_batches, setup.fixed_ranks, setup.started
    steps_per_round = setup.steps_per_round
    ft_lr = config.ft_lr if strategy.full_finetune else None
    smoothed = SmoothedImportance(config.gamma_max, config.tau)

    folder = RunFolder(config.output_dir)
    current: dict[str, float] | None = None
    importance_history: list[dict] = []  # per round: measured Theta_t and smoothed I_t
    metrics: list[dict] = []
    sim_time, wall_offset, start_round = 0.0, 0.0, 1
    if resume:
        state, tensors = folder.load_checkpoint()
        try:
            saved = Plan.from_state(state["plan"]).clients
            if sorted(c.client for c in saved) != list(range(len(saved))) or len(saved) > len(shards):
                raise ValueError("the plan's clients differ from the config's")
            engine.load_state(
                state, tensors,
                [RoundPlan(c.client, state["round"], c.split_point, c.all_ranks(), config.tail, strategy.adapters)
                 for c in saved],
                ft_lr,
            )  # fmt: skip
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
        smoothed.round, smoothed.value, smoothed.gamma = (state["smoothing"][k] for k in ("round", "value", "gamma"))
        plan = Plan.from_state(state["plan"])
        current = state["importance"]
        importance_history = state["importance_history"]
        start_round, sim_time, wall_offset = state["round"] + 1, state["sim_time_s"], state["wall_time_s"]
        metrics = [m for m in folder.read_metrics() if m["round"] <= state["round"]]
        folder.rewrite_metrics(metrics)  # drop a line written after the checkpoint by a crashed run
        first_plan = False
        log(f"resuming {folder.path} after round {state['round']}")
    else:
        # Round 1's importance: a warm-up pass of one batch per client on the frozen model.
        if strategy.uses_importance and fixed_ranks is None:
            per_client = [
                importance(sums, batches, memory, config.r_ref) for sums, batches in engine.warmup_importance()
            ]
            current = smoothed.update(average_importance(per_client, [len(s) for s in shards]))
            importance_history.append({"round": 0, "smoothed": current})
        # The first plan comes before anything is written: an impossible budget stops the run here.
        plan = strategy.make_plan(current)
        first_plan = True
        if config.split_point is not None or config.rank is not None:
            warn_over_budget(plan, strategy, log)
        if config.engine == "inprocess":
            remedy = "lower batch_size or max_seq_len, use fewer clients, or --engine ray on several machines."
            check_fits(simulation_bytes(memory, plan), "simulating every client in this process", remedy)
        if overwrite:
            folder.clear()
        folder.write_config({**config.to_dict(), "resolved": {
            "devices": [d.to_dict() for d in devices], "server_budget_bytes": server_budget,
            "shard_sizes": [len(s) for s in shards], "num_blocks": num_blocks, "memory_model": memory.to_dict(),
            "candidates": len(candidates), "data": setup.data_description, "data_notes": setup.notes,
        }})  # fmt: skip
        folder.rewrite_metrics([])
        log(f"run folder: {folder.path}")
        for note in setup.notes:
            log(note)
        log(f"{config.partition} partition, samples per client: {[len(s) for s in shards]}")

    for round_ in range(start_round, config.rounds + 1):
        round_started = time.perf_counter()
        distance = kendall_tau_distance(current, strategy.importance_at_last_plan) if (
            current and strategy.importance_at_last_plan) else None  # fmt: skip
        replanned = first_plan or strategy.wants_replan(round_, current)
        if replanned and not first_plan:
            plan = strategy.make_plan(current)
        first_plan = False
        messages = [RoundPlan(c.client, round_, c.split_point, c.all_ranks(), config.tail, strategy.adapters)
                    for c in plan.clients]  # fmt: skip
        engine.reset_traffic()
        engine.configure(messages, full_finetune_lr=ft_lr)
        engine.measure_importance(strategy.uses_importance)
        reporter.round_started(round_, config.rounds, plan, replanned)

        def on_step(step: int, losses: list[float], round_: int = round_, plan: Plan = plan) -> None:
            _check_finite(round_, step, losses, plan, folder)
            reporter.step(round_, step, losses)

        history = engine.local_steps(steps_per_round, on_step)

        if strategy.uses_importance:
            reports = engine.importance_reports()
            theta = average_importance(
                [importance(sums, batches, memory, config.r_ref) for sums, batches, _ in reports],
                [samples for _, _, samples in reports],
            )
            current = smoothed.update(theta)
            importance_history.append({"round": round_, "measured": theta, "smoothed": current})
        tokens = [counters["tokens"] for counters in engine.round_counters()]
        step_traffic = {cid: engine.step_bytes(cid) for cid in engine.traffic}
        if not strategy.centralised:  # one trainer on pooled data has nothing to aggregate
            try:
                engine.aggregate(round_)
            except NonFiniteUpdate as error:
                raise TrainingDiverged(
                    f"{error} at round {round_}; {_stopped(round_, folder, 'lr or alpha')}"
                ) from None

        val_loss = val_ppl = None
        if round_ % config.eval_every == 0 or round_ == config.rounds:
            val_loss = engine.validation_loss(val_batches, strategy.validation_client(plan))
            if not math.isfinite(val_loss):
                stopped = _stopped(round_, folder, "lr or alpha")
                raise TrainingDiverged(f"the validation loss became {val_loss} after round {round_}; {stopped}")
            val_ppl = perplexity(val_loss)
        work = [
            ClientRoundWork(tokens[c.client], step_traffic[c.client],
                            engine.traffic[c.client]["adapters_up"] + engine.traffic[c.client]["adapters_down"])
            for c in plan.clients
        ]  # fmt: skip
        timing = round_time(memory, plan.clients, devices, work, config.server_flops, model.config.vocab_size,
                            setup.hidden_size)  # fmt: skip
        sim_time += timing["round_s"]
        train_loss = mean_present([loss for losses in history for loss in losses])
        line = round_line(
            config, round_, plan, history, engine, timing,
            losses={"train_loss": train_loss, "val_loss": val_loss, "val_ppl": val_ppl},
            times={"sim_time_s": sim_time, "wall_time_s": wall_offset + time.perf_counter() - started,
                   "round_wall_time_s": time.perf_counter() - round_started},
            planning={"replanned": replanned, "kendall_distance": distance,
                      "smoothing_gamma": smoothed.gamma if strategy.uses_importance else None},
        )  # fmt: skip
        metrics.append(line)
        folder.append_metrics(line)
        role_state, tensors = engine.state(strategy.full_finetune)
        folder.save_checkpoint(
            {"round": round_, "strategy": strategy.name, "plan": plan.to_state(), "importance": current,
             "importance_history": importance_history, "importance_at_last_plan": strategy.importance_at_last_plan,
             "smoothing": {"round": smoothed.round, "value": smoothed.value, "gamma": smoothed.gamma},
             "sim_time_s": sim_time, "wall_time_s": line["wall_time_s"], **role_state},
            tensors,
        )  # fmt: skip
        reporter.round_finished(line)

    final = engine.export_weights(strategy.validation_client(plan), strategy.full_finetune)
    export_format = "full" if strategy.full_finetune else "candidates"
    write_tensors_atomic(folder.path / "model.safetensors", final, {"model": config.model, "format": export_format})
    summary = run_summary(config, metrics, sim_time, setup.data_description)
    write_json_atomic(folder.path / "summary.json", summary)
    plots = folder.plot(metrics)
    return RunResult(folder.path, metrics, summary, plots)


def warn_over_budget(plan: Plan, strategy, log: Callable[[str], None]) -> None:
    """A fixed cut or rank runs as given, but a plan a device could not hold is said aloud."""
    from hsplitlora.units import format_bytes

    for c in plan.clients:
        if strategy.splits and c.predicted_bytes > c.budget_bytes:
            log(
                f"warning: the fixed plan needs {format_bytes(c.predicted_bytes)} on client {c.client}, above its "
                f"budget of {format_bytes(c.budget_bytes)}; it runs as asked, but that device could not hold it."
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
