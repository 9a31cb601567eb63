"""Command line: `hsplitlora run`, `compare`, `plan`, `score`, `eval`, `export`, `prepare-model`.

Every run flag has a config key of the same name (dashes become underscores); flags win over
the file. Bad values stop with one sentence and exit status 2.
"""

from __future__ import annotations

import argparse
import math
import re
import signal
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from hsplitlora import interrupts
from hsplitlora.errors import UsageError


def _ints(text: str) -> int | list[int]:
    """`8` or `4,8,12`: one value for every client or one per client."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    return values[0] if len(values) == 1 else values


def _count_or_fraction(text: str) -> int | float:
    """`3` (a count) or `0.5` (a fraction): an integer stays one, so 1 is one client and 1.0 all."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count or a fraction") from None


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _int_list(text: str) -> list[int]:
    """`0,2,4,8`: a list even of one value."""
    value = _ints(text)
    return value if isinstance(value, list) else [value]


# Other spellings of a setting's flag, for run and plan alike (plan's older names among them).
FLAG_ALIASES = {"local_steps": ["--steps"], "max_seq_len": ["--seq-len"], "rank_levels": ["--levels"]}


def _add_setting_flags(parser: argparse.ArgumentParser, names: Sequence[str], required: Sequence[str] = ()) -> None:
    """A flag for each setting of `names`, with config.FLAGS' help, a type from the field's hint
    and the default shown from RunConfig (the flag itself defaults to None: not given)."""
    import dataclasses
    import typing

    from hsplitlora.config import FLAGS, RunConfig

    hints = typing.get_type_hints(RunConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(RunConfig) if f.default is not dataclasses.MISSING}
    defaults.update(targets=",".join(RunConfig().targets), rank_levels=",".join(map(str, RunConfig().rank_levels)))
    for name in names:
        hint = hints[name]
        options = typing.get_args(hint) or (hint,)
        if hint == list[int]:
            kind = _int_list
        elif list[int] in options:
            kind = _ints
        elif hint == list[str]:
            kind = _names
        elif int in options and float in options:
            kind = _count_or_fraction
        elif float in options:
            kind = float
        elif int in options:
            kind = int
        else:
            kind = str
        default = defaults.get(name)
        help_text = FLAGS[name] if default is None else f"{FLAGS[name]} (default {default})"
        flags = ["--" + name.replace("_", "-"), *FLAG_ALIASES.get(name, [])]
        parser.add_argument(*flags, dest=name, type=kind, help=help_text, required=name in required)


def _add_run_options(parser: argparse.ArgumentParser, one_run: bool = True) -> None:
    """A flag for every setting of config.FLAGS; `one_run` adds --strategy and --resume (compare
    takes a list of strategies)."""
    from hsplitlora.config import FLAGS

    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override its keys")
    _add_setting_flags(parser, [name for name in FLAGS if one_run or name != "strategy"])
    parser.add_argument("--overwrite", action="store_true",
                        help="replace what hsplitlora wrote in the output folder before: only the files its "
                             "manifest lists, nothing else (refused without it)")  # fmt: skip
    if one_run:
        parser.add_argument(
            "--resume",
            metavar="RUN_DIR",
            help="continue a run from its last checkpoint (only a larger --rounds may be given)",
        )


# The settings plan shares with run: the same flags, names, defaults and checks.
PLAN_SETTINGS = ("model", "dtype", "client_quant", "server_quant", "budgets", "server_budget", "batch_size",
                 "max_seq_len", "targets", "rank_levels", "rho", "s_min", "split_mode", "tail_blocks", "split_rule",
                 "rank_time_slack", "local_steps", "server_flops", "warmup_batches", "data_dir", "seed", "max_leakage",
                 "leakage_curve", "dp_sgd_sigma", "dp_epsilon", "clients_per_round", "recompute")  # fmt: skip


def _add_plan_options(parser: argparse.ArgumentParser) -> None:
    """run's flags for the settings plan shares with it (PLAN_SETTINGS), and plan's own."""
    _add_setting_flags(parser, PLAN_SETTINGS, required=("budgets",))
    parser.add_argument("--uniform-importance", action="store_true", help="skip the warm-up importance pass")
    parser.add_argument("--leave-out-infeasible", action="store_true",
                        help="leave out, with a warning, clients whose budget holds no cut")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")


def _version() -> str:
    """The installed package's version; a source tree on PYTHONPATH has no metadata."""
    try:
        return version("hsplitlora")
    except PackageNotFoundError:
        return "(source tree, not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsplitlora", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"hsplitlora {_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="split LoRA fine-tuning across clients")
    _add_run_options(run)
    comparison = commands.add_parser(
        "compare", help="several strategies on identical data, budgets and seed",
        description="Runs every strategy of --strategies with run's settings (every setting of run applies to each "
        "of them; the strategy is the one each sub-run changes), then compares time to a target perplexity.",
    )  # fmt: skip
    comparison.add_argument("--strategies", type=_names, required=True, help="e.g. hsplitlora,splitlora,hetlora")
    comparison.add_argument("--target-ppl", type=float,
                            help="perplexity for time-to-target, at least 1 (default: the worst final)")  # fmt: skip
    _add_run_options(comparison, one_run=False)
    planner = commands.add_parser(
        "plan", help="split points and ranks from device memory budgets (ARMSC)",
        description="The split points and ranks `run` would start from (strategy hsplitlora, one client per budget). "
        "Settings shared with run take run's defaults and are checked exactly as run checks them.",
    )  # fmt: skip
    _add_plan_options(planner)
    score = commands.add_parser("score", help="the five E2E metrics, as the official E2E scorer computes them")
    score.add_argument("refs", help="references: E2E plain text (instances separated by an empty line) or CSV")
    score.add_argument("hyp", help="system outputs, one line per instance")
    score.add_argument("--json", action="store_true", help="print the metrics as JSON")
    evaluate = commands.add_parser("eval", help="perplexity, generation and E2E metrics of a finished run")
    evaluate.add_argument("run_dir", help="a run folder written by hsplitlora run")
    evaluate.add_argument("--limit", type=int, help="evaluate the first N test MRs only")
    evaluate.add_argument("--beams", type=int, default=10, help="beam size (10)")
    evaluate.add_argument("--length-penalty", type=float, default=0.8, help="length penalty (0.8)")
    evaluate.add_argument("--no-repeat-ngram", type=int, default=4, help="no-repeat n-gram size (4)")
    evaluate.add_argument("--max-new-tokens", type=int, default=64, help="new tokens at most (64)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="MRs generated together (8)")
    evaluate.add_argument("--data-dir", help="folder holding testset_w_refs.csv (default: the run's)")
    evaluate.add_argument("--output", metavar="DIR", help="write predictions.txt and eval.json here (default: RUN_DIR)")
    evaluate.add_argument("--overwrite", action="store_true",
                          help="replace an earlier eval.json and predictions.txt that hsplitlora wrote")  # fmt: skip
    evaluate.add_argument("--device", default="cpu", help="where to compute: cpu (default), cuda, cuda:N or mps")
    export = commands.add_parser("export", help="a finished run's merged model as a Hugging Face folder")
    export.add_argument("run_dir", help="a run folder written by hsplitlora run")
    target = export.add_mutually_exclusive_group(required=True)
    target.add_argument("--merged", metavar="OUT", help="write a Hugging Face model folder (new or empty)")
    target.add_argument("--adapter", metavar="OUT", help="write a peft LoRA adapter of the whole update")
    export.add_argument("--rank", type=int, default=16, help="rank of the --adapter export (truncated SVD, 16)")
    export.add_argument("--overwrite", action="store_true",
                        help="replace an earlier export in OUT (only the files it wrote; others stay)")  # fmt: skip
    prepare = commands.add_parser("prepare-model", help="convert the default model's GGUF into the cache")
    prepare.add_argument("--force", action="store_true", help="convert again even if cached")
    leakage = commands.add_parser("leakage", help="the main server's attack on what a run's clients send at the cut")
    leakage.add_argument("run_dir", help="a run folder written by hsplitlora run (of a strategy that splits)")
    leakage.add_argument("--cuts", help="split points to measure, e.g. 1,2,4 (default: the run's fixed cut, else 1)")
    leakage.add_argument("--batches", type=int, default=4, help="each client's first N training batches (4)")
    leakage.add_argument("--public-rows", type=int, default=400, help="public passages the attacker trains on (400)")
    leakage.add_argument("--public-text", help="the attacker's text, a passage a line (E2E: its test set)")
    leakage.add_argument("--attack-steps", type=int, default=400, help="training steps of each cut's decoder (400)")
    leakage.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's choice)")
    leakage.add_argument("--informed", action="store_true",
                         help="the attacker also holds the run's final weights")  # fmt: skip
    return parser


def _run_keys() -> tuple[str, ...]:
    from hsplitlora.config import FLAGS

    return tuple(FLAGS)


RUN_KEYS = _run_keys()


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from hsplitlora.checks import load_config
    from hsplitlora.rounds import Reporter, resume_config, run

    if args.resume:
        changed = [key for key in RUN_KEYS if key != "rounds" and getattr(args, key) is not None]
        if changed or args.config or args.overwrite:
            flag = (changed or ["config" if args.config else "overwrite"])[0].replace("_", "-")
            raise UsageError(
                f"--resume continues a run with its own settings; drop --{flag} "
                "(only --rounds may be given, to extend the run)."
            )
        config = resume_config(args.resume, args.rounds)
    else:
        config = load_config(args.config, {key: getattr(args, key) for key in RUN_KEYS})
    from hsplitlora.rounds import prepare_paths

    prepare_paths(config, bool(args.resume), args.overwrite)  # names the folder now, so an interruption can say it
    interrupts.exit_note = lambda: _interrupted_run(Path(config.output_dir))  # also after a hard exit
    console = Console(stderr=True)
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()]  # fmt: skip

    class ProgressReporter(Reporter):
        """Progress appears once training starts, so that setup errors print alone."""

        def __init__(self):
            self.progress: Progress | None = None

        def round_started(self, round_, rounds, plan, replanned):
            if self.progress is None:
                self.progress = Progress(*columns, console=console)
                self.progress.start()
                self.task = self.progress.add_task("", total=rounds * config.local_steps, loss="-")
            cuts = [c.split_point for c in plan.clients]
            ranks = [sum(c.ranks.values()) for c in plan.clients]
            state = "new plan" if replanned else "same plan"
            self.progress.update(self.task, description=f"round {round_}/{rounds}")
            shape = "" if plan.tail_blocks is None else f" (U-shaped, clients keep the last {plan.tail_blocks})"
            self.progress.console.print(f"round {round_}: {state}, split points {cuts}{shape}, client ranks {ranks}")

        def step(self, round_, step, losses):
            present = [loss for loss in losses if loss is not None]  # clients not sampled (or lost) have none
            self.progress.update(self.task, advance=1, loss=f"{sum(present) / max(len(present), 1):.4f}")

        def round_finished(self, line):
            ppl = f"{line['val_ppl']:.3f}" if line["val_ppl"] is not None else "-"
            self.progress.console.print(
                f"round {line['round']}: train loss {line['train_loss']:.4f}, val ppl {ppl}, "
                f"simulated {line['sim_time_s']:.1f} s, wall {line['wall_time_s']:.1f} s"
            )

    reporter = ProgressReporter()
    try:
        result = run(config, reporter=reporter, log=console.print, resume=bool(args.resume), overwrite=args.overwrite)
    except KeyboardInterrupt as interruption:  # Ctrl-C, or SIGTERM (Terminated)
        if reporter.progress is not None:
            reporter.progress.stop()
        print(_interrupted_run(Path(config.output_dir)), file=sys.stderr)
        return 143 if isinstance(interruption, Terminated) else 130
    finally:
        if reporter.progress is not None:
            reporter.progress.stop()
    table = Table(title=f"{config.strategy} on {config.model}: {config.rounds} rounds x {config.local_steps} steps")
    for column in ("round", "train loss", "val loss", "val ppl", "sim. time (s)", "wall (s)", "MB up", "MB down"):
        table.add_column(column, justify="right")
    for m in result.metrics:
        table.add_row(
            str(m["round"]), f"{m['train_loss']:.4f}",
            "-" if m["val_loss"] is None else f"{m['val_loss']:.4f}",
            "-" if m["val_ppl"] is None else f"{m['val_ppl']:.3f}",
            f"{m['sim_time_s']:.1f}", f"{m['wall_time_s']:.1f}",
            f"{m['bytes_up'] / 1e6:.1f}", f"{m['bytes_down'] / 1e6:.1f}",
        )  # fmt: skip
    Console().print(table)
    print(f"results: {result.run_dir} (metrics.jsonl, summary.json, model.safetensors, checkpoint/)")
    print(f"plots:   {', '.join(str(p) for p in result.plots)}")
    return 0


def _interrupted_run(folder: Path) -> str:
    if (folder / "checkpoint").exists() or (folder / ".checkpoint-old").exists():
        resume = f"hsplitlora run --resume {folder}"
        return f"interrupted; the last finished round is saved in {folder}: continue with {resume}"
    return f"interrupted before the first round finished; nothing to resume in {folder}."


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from hsplitlora.checks import load_config
    from hsplitlora.compare import compare
    from hsplitlora.folders import check_output_name
    from hsplitlora.rounds import default_output_dir
    from hsplitlora.units import format_bytes

    if args.target_ppl is not None and not (math.isfinite(args.target_ppl) and args.target_ppl >= 1):
        raise UsageError(f"target-ppl must be a perplexity, a finite number of at least 1, got {args.target_ppl}.")
    config = load_config(args.config, {key: getattr(args, key, None) for key in RUN_KEYS})
    check_output_name(config.output_dir, "--output-dir", "runs/<time>-compare")
    output_dir = Path(config.output_dir) if config.output_dir else default_output_dir("compare")
    console = Console(stderr=True)
    result = compare(config, args.strategies, output_dir, args.target_ppl, log=console.print, overwrite=args.overwrite)
    table = Table(title=f"{config.model}: {config.rounds} rounds x {config.local_steps} steps, seed {config.seed}; "
                        f"target perplexity {result['target_ppl']:.3f}")  # fmt: skip
    for column in ("strategy", "final val ppl", "sim. time to target (s)", "wall to target (s)", "MB sent",
                   "peak client memory"):  # fmt: skip
        table.add_column(column, justify="right")
    for row in result["rows"]:

        def seconds(value):
            return "not reached" if value is None else f"{value:.1f}"

        memory = format_bytes(row["peak_client_bytes"]) + (" *" if row["whole_model_on_clients"] else "")
        table.add_row(row["strategy"], f"{row['final_val_ppl']:.3f}", seconds(row["sim_time_to_target_s"]),
                      seconds(row["wall_time_to_target_s"]), f"{row['bytes'] / 1e6:.1f}", memory)  # fmt: skip
    Console().print(table)
    print("* the whole model on every client: memory reported beside the budgets, not limited by them")
    print(f"comparison: {output_dir}/comparison.json, plot: {result['plot']}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    import warnings

    from rich.console import Console
    from rich.table import Table

    from hsplitlora.checks import load_config
    from hsplitlora.models.loading import load_model
    from hsplitlora.planning import PlanRequest, make_plan
    from hsplitlora.privacy.floor import leakage_at, read_curve
    from hsplitlora.units import format_bytes, parse_budgets

    budgets = parse_budgets(args.budgets)  # one client per budget listed
    settings = {name: getattr(args, name) for name in PLAN_SETTINGS} | {"clients": len(budgets)}
    if args.tail_blocks is not None and args.split_mode is None:  # --tail-blocks alone asks for a U-shaped split
        settings["split_mode"] = "u"
    config = load_config(None, settings)  # run's validation, so plan refuses exactly what run refuses
    request = PlanRequest.from_config(config, args.uniform_importance, args.leave_out_infeasible)
    server_budget = request.server_budget
    loaded = load_model(config.model, seed=config.seed, dtype=config.dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = make_plan(loaded, request)
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    plan = result.plan
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return 0
    importance_source = "uniform" if args.uniform_importance else f"warm-up pass of {config.warmup_batches} batches"
    shape = "" if plan.tail_blocks is None else f", U-shaped: clients also keep the last {plan.tail_blocks} block(s)"
    table = Table(title=f"ARMSC plan for {config.model} (batch {config.batch_size} x {config.max_seq_len} tokens, "
                        f"importance: {importance_source}, cuts: {config.split_rule}{shape})")  # fmt: skip
    curve = read_curve(config.leakage_curve, config.model, config.split_mode) if config.leakage_curve else None
    columns = ("client", "budget", "split point", "adapters", "total rank", "predicted memory", "headroom")
    for column in columns + (("leakage",) if curve else ()):
        table.add_column(column, justify="right", no_wrap=True)
    rows = {
        client.client: (
            format_bytes(client.budget_bytes), f"{client.split_point}{' (recomputed)' if client.recompute else ''}",
            f"{sum(1 for r in client.ranks.values() if r > 0)}/{len(client.ranks)}", str(sum(client.ranks.values())),
            format_bytes(client.predicted_bytes), format_bytes(client.headroom_bytes),
            *((f"{leakage_at(curve, client.split_point):.3f}",) if curve else ()),
        )
        for client in plan.clients
    }  # fmt: skip
    left_out = ("left out", "-", "-", "-", "-") + (("-",) if curve else ())
    rows.update({cid: (format_bytes(budgets[cid]), *left_out) for cid in plan.left_out})
    for client_id in sorted(rows):
        table.add_row(str(client_id), *rows[client_id])
    console = Console(width=max(Console().width, 100))
    console.print(table)
    server_rows = ", ".join(
        f"client {c.client}: {sum(1 for r in c.server_ranks.values() if r)} adapters, "
        f"{format_bytes(c.server_predicted_bytes)}"
        for c in plan.clients
    )
    sharing = plan.sharing or len(budgets)  # under client sampling only m clients share it at once
    at_once = f"per client, {sharing} of {len(budgets)} a round" if plan.sharing else "per client"
    console.print(
        f"main server: budget {format_bytes(server_budget)} ({format_bytes(server_budget // sharing)} {at_once}), "
        f"shared frozen weights {format_bytes(plan.server_frozen_bytes)}; {server_rows}"
    )
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import json

    from hsplitlora.evaluation.e2e_metrics import check_counts, read_outputs, read_references, score_e2e

    references = read_references(args.refs)
    outputs = read_outputs(args.hyp)
    check_counts(references, outputs)
    scores = score_e2e(references, outputs)
    if args.json:
        print(json.dumps(scores))
    else:
        print(format_scores(scores))
    return 0


def format_scores(scores: dict[str, float]) -> str:
    """The official scorer's layout: a header line, then `NAME: value` to four decimals."""
    lines = ["SCORES:", "=============="]
    lines += [f"{name}: {scores[name]:.4f}" for name in ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")]
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hsplitlora.evaluation.generation import GenerationSettings
    from hsplitlora.evaluation.run_eval import evaluate_run

    for name in ("beams", "max_new_tokens", "batch_size", "no_repeat_ngram"):
        if getattr(args, name) < 1:
            raise UsageError(f"{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}.")
    if args.limit is not None and args.limit < 1:
        raise UsageError(f"limit must be a positive integer, got {args.limit}.")
    if not math.isfinite(args.length_penalty):  # beam search scores divide by length ** penalty
        raise UsageError(f"length-penalty must be a finite number (0 ignores length, larger favours longer outputs), "
                         f"got {args.length_penalty}.")  # fmt: skip
    settings = GenerationSettings(args.beams, args.length_penalty, args.no_repeat_ngram, args.max_new_tokens,
                                  args.batch_size)  # fmt: skip
    columns = [TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task("generating", total=None)
        result = evaluate_run(args.run_dir, args.limit, settings,
                              lambda done, total: progress.update(task, completed=done, total=total),
                              data_dir=args.data_dir, output=args.output, overwrite=args.overwrite,
                              device=args.device)  # fmt: skip
    print(f"perplexity {result['perplexity']:.4f} over {result['target_tokens']} target tokens "
          f"({result['references']} references of {result['mrs']} MRs)")  # fmt: skip
    print(format_scores(result["metrics"]))
    print(f"wrote {result['output']}/predictions.txt and {result['output']}/eval.json")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from hsplitlora.evaluation.export import export_adapter, export_merged

    if args.merged is not None:
        path = export_merged(args.run_dir, args.merged, args.overwrite)
        print(f"merged model written to {path} (load it with AutoModelForCausalLM.from_pretrained)")
        return 0
    errors = export_adapter(args.run_dir, args.adapter, args.rank, args.overwrite)
    worst = max(errors, key=errors.get)
    print(f"peft adapter (rank {args.rank}) written to {args.adapter}; relative error of the truncated update: "
          f"mean {sum(errors.values()) / len(errors):.4f}, worst {errors[worst]:.4f} ({worst}); "
          f"per matrix in {args.adapter}/approximation_error.json")  # fmt: skip
    return 0


def cmd_leakage(args: argparse.Namespace) -> int:
    from hsplitlora.privacy.leakage import format_report, measure_leakage, parse_cuts, write_report

    for name in ("batches", "public_rows", "attack_steps", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"{name.replace('_', '-')} must be a positive integer, got {value}.")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cuts = parse_cuts(args.cuts) if args.cuts is not None else None
    report = measure_leakage(args.run_dir, cuts, args.batches, args.public_rows, args.public_text, args.attack_steps,
                             informed=args.informed)  # fmt: skip
    print(format_report(report))
    print(f"wrote {write_report(args.run_dir, report)}")
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from hsplitlora.models.loading import prepare_smollm2

    path = prepare_smollm2(force=args.force)
    print(f"SmolLM2-135M-Instruct cached at {path}")
    return 0


COMMANDS = {
    "run": cmd_run,
    "plan": cmd_plan,
    "score": cmd_score,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "export": cmd_export,
    "prepare-model": cmd_prepare_model,
    "leakage": cmd_leakage,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled as Ctrl-C is (exit status 143)."""


def _terminate(signum, frame) -> None:
    raise Terminated()


NEGATIVE_VALUE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)  # -1, -.5, -inf, -5MB, -2,0,4


def attach_negative_values(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`--alpha -inf` as `--alpha=-inf`: argparse takes a value that starts with a dash and is not a
    plain number for an option and says "expected one argument"; our validation should answer."""
    takes_value: set[str] = set()
    parsers = [parser]
    while parsers:
        for action in parsers.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += list(action.choices.values())
            elif action.option_strings and action.nargs != 0:
                takes_value.update(action.option_strings)
    joined: list[str] = []
    for token in argv:
        if joined and joined[-1] in takes_value and NEGATIVE_VALUE.match(token):
            joined[-1] = f"{joined[-1]}={token}"
        else:
            joined.append(token)
    return joined


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(attach_negative_values(parser, sys.argv[1:] if argv is None else list(argv)))
    from hsplitlora.interrupts import exit_promptly_on_signals

    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with exit_promptly_on_signals():
            return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"hsplitlora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interruption:
        print("interrupted", file=sys.stderr)
        return 143 if isinstance(interruption, Terminated) else 130
    except BrokenPipeError:  # the reader of our output (`| head`) stopped reading: nothing to tell it
        _silence_stdout()
        return 141  # 128 + SIGPIPE, as a shell reports a writer whose reader went away
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail again."""
    import os
    from contextlib import suppress

    with suppress(OSError, ValueError, AttributeError):  # stdout replaced (tests) or already closed
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    sys.exit(main())
