"""Command line: `hsplitlora run`, `hsplitlora prepare-model`.

Every run flag has a config key of the same name (dashes become underscores); flags win over
the file. Bad values stop with one sentence and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from hsplitlora.config import ALL_TARGETS, load_config
from hsplitlora.errors import UsageError


def _ints(text: str) -> int | list[int]:
    """`8` or `4,8,12`: one value for every client or one per client."""
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or a comma-separated list of integers") from None
    return values[0] if len(values) == 1 else values


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.yaml", help="settings file; flags override its keys")
    parser.add_argument("--model", help="smollm2-135m (default), tiny, tiny-gpt2, or a local HF model folder")
    parser.add_argument("--data-dir", help="folder holding devset.csv and testset_w_refs.csv")
    parser.add_argument("--clients", type=int, help="number of clients K (default 5)")
    parser.add_argument("--split-point", type=_ints, help="split point(s): one for all clients or one per client")
    parser.add_argument("--rank", type=_ints, help="LoRA rank(s): one for all clients or one per client")
    parser.add_argument("--alpha", type=float, help="LoRA alpha (default 16)")
    parser.add_argument("--targets", type=_names, help=f"candidate matrices, from {','.join(ALL_TARGETS)}")
    parser.add_argument("--steps", type=int, help="local steps per client (default 10)")
    parser.add_argument("--batch-size", type=int, help="examples per step (default 8)")
    parser.add_argument("--max-seq-len", type=int, help="tokens per example at most (default 128)")
    parser.add_argument("--lr", type=float, help="AdamW learning rate (default 5e-4)")
    parser.add_argument("--seed", type=int, help="seed: the same seed gives the same numbers")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hsplitlora", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="split LoRA fine-tuning across clients")
    _add_run_options(run)
    prepare = commands.add_parser("prepare-model", help="convert the default model's GGUF into the cache")
    prepare.add_argument("--force", action="store_true", help="convert again even if cached")
    return parser


RUN_KEYS = (
    "model", "data_dir", "clients", "split_point", "rank", "alpha", "targets", "steps",
    "batch_size", "max_seq_len", "lr", "seed", "threads",
)  # fmt: skip


def cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from hsplitlora.training import build_federation, train_steps

    config = load_config(args.config, {key: getattr(args, key) for key in RUN_KEYS})
    console = Console(stderr=True)
    started = time.perf_counter()
    with console.status(f"loading {config.model} and the E2E data"):
        federation = build_federation(config)
    split_points = [client.split_point for client in federation.clients]
    console.print(
        f"[bold]{config.model}[/]: {config.clients} clients, split points {split_points}, "
        f"ranks {config.per_client('rank')}, {sum(federation.shard_sizes)} training examples "
        f"(shards {federation.shard_sizes})"
    )
    columns = [TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn()]  # fmt: skip
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("split steps", total=config.steps, loss="-")

        def on_step(step: int, losses: list[float]) -> None:
            progress.update(task, advance=1, loss=f"{sum(losses) / len(losses):.4f}")

        history = train_steps(federation, config.steps, on_step)
    table = Table(title=f"split LoRA training, {config.steps} steps per client")
    for column in ("client", "split point", "rank", "first loss", "last loss", "MB up", "MB down"):
        table.add_column(column, justify="right")
    engine = federation.engine
    for client in federation.clients:
        cid = client.client_id
        table.add_row(
            str(cid), str(client.split_point), str(config.per_client("rank")[cid]),
            f"{history[0][cid]:.4f}", f"{history[-1][cid]:.4f}",
            f"{engine.bytes_up[cid] / 1e6:.1f}", f"{engine.bytes_down[cid] / 1e6:.1f}",
        )  # fmt: skip
    Console().print(table)
    console.print(f"done in {time.perf_counter() - started:.1f} s")
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    from hsplitlora.models.loading import prepare_smollm2

    path = prepare_smollm2(force=args.force)
    print(f"SmolLM2-135M-Instruct cached at {path}")
    return 0


COMMANDS = {"run": cmd_run, "prepare-model": cmd_prepare_model}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UsageError as error:
        print(f"hsplitlora {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
