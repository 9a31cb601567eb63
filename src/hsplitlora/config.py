"""Run configuration: one flat dataclass; YAML keys and CLI flags share the same names."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hsplitlora.errors import UsageError, read_text
from hsplitlora.units import parse_bytes

DEFAULT_TARGETS = ("q", "k", "v", "o")
ALL_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
SPLIT_MODES = ("standard", "u")
INPROCESS, RAY, FLOWER = "inprocess", "ray", "flower"
ENGINES = (INPROCESS, RAY, FLOWER)
DEFAULT_RANK = 8  # a client's rank when its cut is fixed and its rank is not (the foundation's)
DEFAULT_COMPRESSION = "fp32"  # nothing compressed across the cut


@dataclass
class RunConfig:
    """Everything a run needs. Per-client values (`split_point`, `rank`) take one int for every
    client or a list with one entry per client."""

    model: str = "smollm2-135m"
    # Training data: e2e (built in), or a JSONL/JSON/CSV/Parquet file or save_to_disk folder of
    # prompt/response, instruction/input/output or chat (messages) records; or one file per client.
    data: str = "e2e"
    val_data: str | None = None  # default: E2E's test set, or a held-out slice of your data
    client_data: str | None = None  # a folder with one data file per client, in sorted name order
    prompt_field: str = "prompt"
    response_field: str = "response"
    partition_field: str | None = None  # Dirichlet over this field's values (E2E: eatType and food)
    data_dir: str | None = None  # E2E's folder; default: $HSPLITLORA_DATA_DIR or ../shared/data/e2e
    dtype: str = "float32"  # the frozen weights: float32 | bfloat16 | float16 (adapters stay float32)
    # Frozen block weights held in 8 or 4 bits (none | int8 | nf4): the clients' blocks, the main server's.
    client_quant: str = "none"
    server_quant: str = "none"
    device: str = "cpu"  # cpu | cuda | cuda:N | mps, for every role ...
    client_device: str | None = None  # ... or the clients' and the main server's apart
    server_device: str | None = None
    strategy: str = "hsplitlora"
    clients: int = 5
    # Clients that train each round: a count (1..clients) or a fraction in (0, 1]; None: every client.
    clients_per_round: int | float | None = None
    rounds: int = 2
    local_steps: int = 10  # E: local steps per client per round (flag alias: --steps)
    # Devices: explicit budgets ("800MB,1.5GB,..."), else a named preset; per-client overrides
    # {client: {budget, flops, bandwidth}} in the config file.
    budgets: str | list[str] | None = None
    device_preset: str = "hetero5"
    devices: dict | None = None
    server_budget: str = "16GB"
    server_flops: float = 20e12  # the main server's compute speed (FLOP/s), for the time model
    # Fixed split points / ranks (one value or one per client) override the planner.
    split_point: int | list[int] | None = None
    rank: int | list[int] | None = None
    alpha: float = 16.0
    # The adapter's scale: standard (alpha / r, LoRA's) | rslora (alpha / sqrt(r), rank-stabilised)
    lora_scaling: str = "standard"
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank_levels: list[int] = field(default_factory=lambda: [0, 2, 4, 8, 16])
    rho: float = 0.25
    s_min: int = 1
    r_ref: int = 8
    gamma_max: float = 0.9
    tau: float = 5.0
    replan_delta: float = 0.1
    # ARMSC's cuts: fastest (the predicted round time, under every memory budget) | deepest (memory only)
    split_rule: str = "fastest"
    # Ranks that cost time (beyond method.md): ranks may lengthen the predicted round by at most this
    # share over the same cuts at the smallest positive rank (None: ranks by memory and importance only).
    rank_time_slack: float | None = None
    # Activation recomputation on the clients' front blocks (beyond method.md): off | on | auto (each
    # client recomputes exactly where its cut would not fit its budget otherwise; the planner may cut deeper).
    recompute: str = "off"
    # HSplitLoRA's adapters: persist (kept with their optimizer state, measured from an anchor) | recreate
    adapter_lifecycle: str = "persist"
    warmup_batches: int = 1
    partition: str = "iid"
    dirichlet_alpha: float = 0.5
    batch_size: int = 8
    max_seq_len: int = 128
    lr: float = 5e-4
    ft_lr: float = 5e-5  # learning rate of the full fine-tuning baseline (every weight)
    eval_every: int = 1
    val_size: int = 128  # evaluation rows of testset_w_refs.csv used for validation loss
    output_dir: str | None = None
    compression: str = DEFAULT_COMPRESSION  # activations and gradients across the cut: fp32 | fp16 | bf16 | int8
    # NAA's update sent down: exact (stacked rows without the receiver's own term, or dense) | svd-ef
    # (best rank-update_rank approximation with error feedback; update_energy may lower the rank)
    update_form: str = "exact"
    update_rank: int = 32
    update_energy: float | None = None
    # standard: the main server runs blocks [s, L), the head and the loss (labels cross the cut);
    # u: the client also keeps the last `tail_blocks` blocks, the head and the loss (labels stay).
    split_mode: str = "standard"
    tail_blocks: int = 1
    engine: str = INPROCESS  # inprocess | ray | flower
    ray_address: str | None = None  # join this Ray cluster; default: a local instance on localhost
    ray_client_resources: dict | None = None  # Ray actor options per client: num_cpus, num_gpus, memory, resources
    ray_server_resources: dict | None = None  # Ray actor options of the main server (e.g. num_gpus: 1)
    # Differential privacy (method.md section 10, docs/privacy.md). On the activations: each example's
    # activation at the cut clipped to dp_clip, N(0, (sigma dp_clip)^2) added before it leaves the client;
    # a target dp_activations_epsilon calibrates the sigma instead.
    dp_activations_sigma: float = 0.0
    dp_activations_epsilon: float | None = None
    dp_clip: float | None = None
    # DP-SGD on every adapter trained on a client's data (its blocks' and its adapters on the main
    # server): per-example gradients clipped to dp_grad_clip, N(0, (sigma dp_grad_clip)^2) added.
    dp_sgd_sigma: float = 0.0
    dp_epsilon: float | None = None  # a target epsilon for DP-SGD: calibrates dp_sgd_sigma
    dp_grad_clip: float = 1.0
    # DP-SGD's logical batch: one noisy step spans this many consecutive batches (each example
    # clipped, the sum noised once, the optimizer steps once), so its sampling rate is
    # dp_batches x batch_size over the shard; local_steps must be a multiple of it.
    dp_batches: int = 1
    dp_delta: float | None = None  # default 1 / the client's shard size
    # Privacy floor of ARMSC: only cuts whose measured leakage (share of tokens the main server's
    # attack recovers, from leakage_curve: a leakage.json of `hsplitlora leakage`) is at most max_leakage.
    max_leakage: float | None = None
    leakage_curve: str | None = None
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default

    def per_client(self, name: str) -> list[int]:
        """The value of a per-client setting expanded to one int per client."""
        value = getattr(self, name)
        values = list(value) if isinstance(value, list | tuple) else [value] * self.clients
        if len(values) != self.clients:
            raise UsageError(
                f"{name} lists {len(values)} values but there are {self.clients} clients; "
                f"give one value or exactly {self.clients}."
            )
        return [int(v) for v in values]

    def split_points(self, num_blocks: int) -> list[int]:
        """Per-client split points; by default spread evenly: s_i = round(L (i+1) / (K+1))."""
        if self.split_point is None:
            return [
                min(max(1, round(num_blocks * (i + 1) / (self.clients + 1))), num_blocks - 1)
                for i in range(self.clients)
            ]
        return self.per_client("split_point")

    def validate(self) -> RunConfig:
        """Check every value on its own terms (types, ranges, names); the checks that need the
        strategies, the data, the devices or torch are `checks.check`'s. Raises UsageError on the
        first bad value."""
        hints = typing.get_type_hints(RunConfig)
        _check_clients_per_round(self.clients_per_round, self.clients)  # before the type check: nan is named here
        for item in dataclasses.fields(self):
            _check_type(item.name, getattr(self, item.name), hints[item.name])
        for name in POSITIVE_INTEGERS + (("threads",) if self.threads is not None else ()):
            _positive(name, getattr(self, name))
        for name in ("lr", "alpha", "tau", "ft_lr", "server_flops", "dirichlet_alpha"):
            if not getattr(self, name) > 0:
                raise UsageError(f"{name} must be a positive number, got {getattr(self, name)}.")
        for name in ("rho", "gamma_max"):
            if not 0 <= getattr(self, name) < 1:
                raise UsageError(f"{name} must be in [0, 1), got {getattr(self, name)}.")
        if self.rank_time_slack is not None and not 0 <= self.rank_time_slack < math.inf:
            raise UsageError(f"rank_time_slack is the share ranks may add to the predicted round time, a number "
                             f"of at least 0 (0.05: 5%); got {self.rank_time_slack}.")  # fmt: skip
        if not 0 <= self.replan_delta <= 1:
            raise UsageError(f"replan_delta must be in [0, 1], got {self.replan_delta}.")
        if not 0 <= self.seed <= 2**32 - 1:
            raise UsageError(f"seed must be an integer from 0 to {2**32 - 1}, got {self.seed}.")
        parse_bytes(self.server_budget)
        for rank in self.per_client("rank") if self.rank is not None else []:
            if rank < 0:
                raise UsageError(f"rank must be 0 (no adapter) or a positive integer, got {rank}.")
        if self.rank is not None and max(self.per_client("rank")) == 0:
            raise UsageError(f"rank {self.rank} gives no client an adapter, so nothing would be trained; give a "
                             "positive rank (a 0 in a per-client list leaves one client out).")  # fmt: skip
        if self.split_point is not None:
            self.per_client("split_point")
        for name, choices in CHOICES.items():
            if getattr(self, name) not in choices:
                raise UsageError(f"{name} {getattr(self, name)!r} is unknown; choose {' or '.join(choices)}.")
        if self.tail_blocks < 0:
            raise UsageError(f"tail_blocks must be 0 or a positive integer, got {self.tail_blocks}.")
        if self.update_energy is not None and not 0 < self.update_energy <= 1:
            raise UsageError(f"update_energy must be in (0, 1], the share of squared singular values kept; got "
                             f"{self.update_energy}.")  # fmt: skip
        self._validate_dp()
        levels = self.rank_levels
        if sorted(set(levels)) != sorted(levels) or 0 not in levels or min(levels) < 0:
            raise UsageError(f"rank_levels {self.rank_levels} must be distinct non-negative integers including 0.")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise UsageError(
                f"targets {self.targets} are not valid; choose a non-empty subset of {', '.join(ALL_TARGETS)}."
            )
        repeated = sorted({t for t in self.targets if self.targets.count(t) > 1})
        if repeated:
            raise UsageError(f"targets {self.targets} name {repeated[0]} more than once; name each matrix once.")
        return self

    def _validate_dp(self) -> None:
        for name in ("dp_activations_sigma", "dp_sgd_sigma"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be 0 (off) or a positive noise multiplier, got {getattr(self, name)}.")
        for name in ("dp_activations_epsilon", "dp_epsilon", "dp_clip", "dp_grad_clip"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise UsageError(f"{name} must be a positive number, got {value}.")
        if self.dp_delta is not None and not 0 < self.dp_delta < 1:
            raise UsageError(f"dp_delta must be in (0, 1), got {self.dp_delta}.")
        if self.local_steps % self.dp_batches:
            raise UsageError(f"dp_batches {self.dp_batches} does not divide local_steps {self.local_steps}: a round's "
                             "steps must make whole DP-SGD steps; choose a divisor of local_steps.")  # fmt: skip
        for sigma, target in (("dp_activations_sigma", "dp_activations_epsilon"), ("dp_sgd_sigma", "dp_epsilon")):
            if getattr(self, sigma) > 0 and getattr(self, target) is not None:
                raise UsageError(f"{sigma} and {target} both set the noise; give one of the two.")
        if self.max_leakage is not None and not 0 <= self.max_leakage <= 1:
            raise UsageError(f"max_leakage is a share of tokens recovered, in [0, 1]; got {self.max_leakage}.")
        if self.max_leakage is not None and self.leakage_curve is None:
            raise UsageError("max_leakage needs leakage_curve, a leakage.json that `hsplitlora leakage RUN_DIR` "
                             "wrote for this model (docs/privacy/ has SmolLM2-135M's on E2E).")  # fmt: skip
        if self.dp_activations and self.dp_clip is None:
            raise UsageError("noise on the activations needs dp_clip, the L2 norm each example's activation at "
                             "the cut is clipped to (docs/privacy.md lists SmolLM2's activation norms).")  # fmt: skip

    @property
    def dp_activations(self) -> bool:
        """Whether the clients' activations are clipped and noised at the cut."""
        return self.dp_activations_sigma > 0 or self.dp_activations_epsilon is not None

    @property
    def dp_sgd(self) -> bool:
        """Whether the adapters train with DP-SGD."""
        return self.dp_sgd_sigma > 0 or self.dp_epsilon is not None

    @property
    def tail(self) -> int | None:
        """The client's tail blocks in a U-shaped split; None for the standard split."""
        return self.tail_blocks if self.split_mode == "u" else None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


POSITIVE_INTEGERS = ("clients", "rounds", "local_steps", "eval_every", "val_size", "batch_size", "max_seq_len",
                     "s_min", "r_ref", "warmup_batches", "update_rank", "dp_batches")  # fmt: skip
# Settings that name one of a few choices (those that need another module: checks.py).
CHOICES: dict[str, tuple[str, ...]] = {
    "split_mode": SPLIT_MODES,
    "split_rule": ("fastest", "deepest"),
    "recompute": ("off", "on", "auto"),
    "adapter_lifecycle": ("persist", "recreate"),
    "lora_scaling": ("standard", "rslora"),
    "update_form": ("exact", "svd-ef"),
    "engine": ENGINES,
    "partition": ("iid", "dirichlet"),
}


# The settings a command-line flag sets (`--split-point` for split_point), with their help; the
# CLI builds its flags from this table, their types from the fields' hints and the defaults from
# RunConfig, so a setting is declared once. The others are config-file keys only.
FLAGS: dict[str, str] = {
    "model": "smollm2-135m, tiny, tiny-gpt2, or a local Hugging Face model folder",
    "data": "e2e, or a .jsonl/.json/.csv/.parquet file or save_to_disk folder of prompt/response, "
    "instruction/input/output or chat (messages) records",
    "val_data": "validation file (default: E2E's test set, or a held-out slice of --data)",
    "client_data": "a folder with one data file per client, in sorted name order (--clients is their number)",
    "prompt_field": "with your own --data, --val-data or --client-data: the prompt's field in prompt/response records",
    "response_field": "with your own data: the response's field in prompt/response records",
    "partition_field": "with --partition dirichlet on your own data: the field whose values group it",
    "data_dir": "with --data e2e: E2E's folder, holding devset.csv and testset_w_refs.csv",
    "dtype": "the frozen weights: float32, bfloat16 or float16 (adapters and optimizer state stay float32)",
    "client_quant": "the clients' frozen block weights: none, int8 or nf4 (adapters and optimizer state stay float32)",
    "server_quant": "the main server's frozen block weights: none, int8 or nf4",
    "device": "cpu, cuda, cuda:N or mps, for every role",
    "client_device": "the clients' device (default: --device)",
    "server_device": "the main server's device (default: --device), e.g. cuda",
    "strategy": "the method or baseline: see README, Strategies",
    "clients": "number of clients K",
    "clients_per_round": "clients that train each round: a count, or a fraction of K (Flower's fraction-fit); "
    "default every client",
    "rounds": "aggregation rounds",
    "local_steps": "local steps E per client per round (alias --steps)",
    "budgets": "client memory budgets, e.g. 300MB,600MB,1.2GB (else the preset's)",
    "device_preset": "named devices when --budgets is not given: hetero5 or homo5",
    "server_budget": "the main server's memory for all clients",
    "server_flops": "the main server's speed in FLOP/s, for the time model",
    "split_point": "fixed split point(s), one or one per client, overriding the planner",
    "rank": "fixed LoRA rank(s), one or one per client, overriding the planner",
    "alpha": "LoRA alpha (the scale is alpha / rank, or alpha / sqrt(rank) with lora_scaling rslora)",
    "lora_scaling": "the adapter's scale: standard (alpha / rank) or rslora (alpha / sqrt(rank): every rank learns "
    "at one speed)",
    "targets": "candidate matrices, from q,k,v,o,gate,up,down",
    "rank_levels": "rank levels Q the planner chooses from: distinct, with 0 (no adapter) among them",
    "rho": "share of each budget kept for adapters, in [0, 1)",
    "s_min": "shallowest split point the planner may choose",
    "warmup_batches": "batches of the warm-up pass that measures importance",
    "partition": "iid or dirichlet (non-IID: E2E's eatType/food, or --partition-field)",
    "dirichlet_alpha": "with --partition dirichlet: the concentration (small: skewed)",
    "batch_size": "examples per step",
    "max_seq_len": "tokens per example at most",
    "lr": "AdamW learning rate of the adapters",
    "eval_every": "validate every N rounds",
    "val_size": "validation examples",
    "output_dir": "run folder (default runs/<time>-<strategy>)",
    "compression": "activations and gradients across the cut: fp32, fp16, bf16 or int8 (per-token absmax scales)",
    "update_form": "NAA's update sent down: exact (without the receiver's own term) or svd-ef (rank-k with "
    "error feedback)",
    "update_rank": "k, the rank of the svd-ef update",
    "update_energy": "svd-ef: the smallest rank up to update_rank keeping this share of squared singular values",
    "split_mode": "standard, or u: the client also keeps the last blocks, the head and the loss",
    "tail_blocks": "last blocks a client keeps with --split-mode u",
    "split_rule": "how ARMSC cuts: fastest (least predicted round time within every budget) or deepest",
    "rank_time_slack": "ranks that cost time: ranks may lengthen the predicted round by at most this share "
    "(0.05: 5 percent) over the same cuts at the smallest positive rank (default: by memory and importance only)",
    "recompute": "clients recompute their blocks' activations in backward (activation checkpointing): off, on, "
    "or auto (each client where its budget holds its cut only so; the planner may then cut deeper)",
    "adapter_lifecycle": "hsplitlora's adapters across rounds: persist (kept, measured from an anchor) or recreate",
    "engine": "inprocess; ray: clients and the main server as Ray actors; flower: clients as Flower ClientApps",
    "ray_address": "with --engine ray: join this Ray cluster at host:port (default: start a local one on localhost)",
    "dp_activations_sigma": "DP on the activations: noise multiplier sigma (0: off); needs --dp-clip",
    "dp_activations_epsilon": "DP on the activations: the target epsilon over the run (calibrates the sigma)",
    "dp_clip": "DP on the activations: each example's activation at the cut is clipped to this L2 norm",
    "dp_sgd_sigma": "DP-SGD on the adapters: noise multiplier sigma (0: off)",
    "dp_epsilon": "DP-SGD on the adapters: the target epsilon over the run (calibrates the sigma)",
    "dp_grad_clip": "DP-SGD: each example's adapter gradient is clipped to this L2 norm",
    "dp_batches": "DP-SGD: batches per noisy step (its logical batch; sampling rate dp_batches x batch_size "
    "over the shard); divides local_steps",
    "dp_delta": "the delta of every epsilon (default 1 / the client's shard size)",
    "max_leakage": "privacy floor: only cuts whose measured token recovery is at most this share (needs "
    "--leakage-curve)",
    "leakage_curve": "a leakage.json of hsplitlora leakage (or docs/privacy/'s curve file) for this model: each "
    "cut's measured leakage",
    "seed": "the same seed gives the same numbers",
    "threads": "torch threads (default: torch's choice)",
}


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is list:
        return f"a list of {_describe(args[0]).replace('an ', '').replace('a ', '')}s"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false", dict: "a mapping",
            type(None): "left out"}.get(hint, str(hint))  # fmt: skip


def _matches(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, a) for a in args)
    if origin is list:
        return isinstance(value, list) and all(_matches(v, args[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, hint)


def _check_type(name: str, value, hint) -> None:
    if not _matches(value, hint):
        raise UsageError(f"{name} must be {_describe(hint)}, got {value!r}.")


def _check_clients_per_round(value: Any, clients: Any) -> None:
    """A count of clients from 1 to K or a fraction in (0, 1]; other types are the type check's."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    if not isinstance(clients, int) or isinstance(clients, bool) or clients < 1:
        return  # clients' own check names it
    count = isinstance(value, int) and 1 <= value <= clients
    fraction = isinstance(value, float) and 0 < value <= 1  # nan fails both comparisons
    if not (count or fraction):
        raise UsageError(
            f"clients_per_round must be a count of clients from 1 to {clients} or a fraction in (0, 1], got {value!r}."
        )


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}.")


def _number_as_written(name: str, value: Any) -> Any:
    """YAML 1.1 reads `1e-3` (no dot) as a string: take it as the number people mean where the
    setting is a number."""
    hint = typing.get_type_hints(RunConfig).get(name)
    if isinstance(value, str) and hint is not None and float in (hint, *typing.get_args(hint)):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def config_fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(RunConfig)}


def read_settings(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The settings given: the YAML file's keys, then explicit overrides (CLI flags) over them.
    `checks.load_config` makes them a checked RunConfig."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise UsageError(f"config file {path} is a folder; give the path of a YAML file.")
        try:
            loaded = yaml.load(read_text(path, "config file"), Loader=_UniqueKeyLoader) or {}
        except _DuplicateKey as exc:
            raise UsageError(f"config file {path} sets {exc.args[0]!r} twice; keep one.") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"config file {path} is not valid YAML ({exc.__class__.__name__}).") from exc
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {path} must hold a mapping of setting names to values.")
        values.update(_file_settings(loaded, path))
    values = {k: _number_as_written(k, v) for k, v in values.items()}
    overrides = {ALIASES.get(k, k): v for k, v in (overrides or {}).items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return values


def make_config(values: dict[str, Any]) -> RunConfig:
    """Defaults with `values` over them, checked on their own terms (`RunConfig.validate`)."""
    unknown = sorted(set(values) - set(config_fields()))
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}; valid settings are {', '.join(sorted(config_fields()))}.")
    try:
        config = RunConfig(**values)
    except TypeError as exc:  # pragma: no cover - guarded by the unknown-key check
        raise UsageError(str(exc)) from exc
    return config.validate()


ALIASES = {"steps": "local_steps"}  # the foundation's name for local_steps
# Settings that hold a path: a config file's relative paths are taken from the file's folder.
PATH_SETTINGS = ("data", "val_data", "client_data", "data_dir", "output_dir", "model", "leakage_curve")


class _DuplicateKey(Exception):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise _DuplicateKey(key)
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def _file_settings(loaded: dict, path: Path) -> dict[str, Any]:
    """A config file's keys as setting names (dashes, aliases), each set once; relative paths
    taken from the file's folder, so a config file works from any directory."""
    settings: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in loaded.items():
        name = str(key).replace("-", "_")
        name = ALIASES.get(name, name)
        if name in spelled:
            raise UsageError(f"config file {path} sets {name} twice, as {spelled[name]!r} and {str(key)!r}; keep one.")
        spelled[name], settings[name] = str(key), value
    for name in PATH_SETTINGS:
        value = settings.get(name)
        if not isinstance(value, str) or not value.strip() or (name == "data" and value == "e2e"):
            continue
        local = Path(value).expanduser()
        if local.is_absolute() or (name == "model" and not (path.parent / local).is_dir()):
            continue  # a model is a name (tiny, smollm2-135m) unless a folder by that path exists
        settings[name] = str(path.parent / local)
    return settings


def refuse_ignored(config: RunConfig, given: set[str]) -> None:
    """A setting given (in the file or as a flag) that would have no effect with the others is
    refused with the reason, rather than recorded and ignored (those about the data and the
    strategy: `checks.check`)."""
    if "tail_blocks" in given and config.split_mode != "u":
        raise UsageError(f"tail_blocks {config.tail_blocks} sets the blocks a client keeps in a U-shaped split, and "
                         f"split_mode is {config.split_mode}; add split_mode u or drop tail_blocks.")  # fmt: skip
    for name in ("ray_address", "ray_client_resources", "ray_server_resources"):
        if getattr(config, name) is not None and config.engine != RAY:
            raise UsageError(f"{name} configures the Ray engine, and engine is {config.engine}; add engine ray or "
                             f"drop {name}.")  # fmt: skip
    if "dp_clip" in given and not config.dp_activations:
        raise UsageError(f"dp_clip {config.dp_clip} clips the activations DP noises, and no noise is set; add "
                         "dp_activations_sigma or dp_activations_epsilon, or drop dp_clip.")  # fmt: skip
    if "dp_grad_clip" in given and not config.dp_sgd:
        raise UsageError(f"dp_grad_clip {config.dp_grad_clip} clips DP-SGD's gradients, and DP-SGD is off; add "
                         "dp_sgd_sigma or dp_epsilon, or drop dp_grad_clip.")  # fmt: skip
    if "dp_batches" in given and config.dp_batches != 1 and not config.dp_sgd:
        raise UsageError(f"dp_batches {config.dp_batches} sets DP-SGD's logical batch, and DP-SGD is off; add "
                         "dp_sgd_sigma or dp_epsilon, or drop dp_batches.")  # fmt: skip
    if "dp_delta" in given and not (config.dp_sgd or config.dp_activations):
        raise UsageError(f"dp_delta {config.dp_delta} is the delta of DP's epsilon, and no DP is set; drop it.")
    if "device_preset" in given and config.budgets is not None:
        raise UsageError(f"device_preset {config.device_preset} names whole devices, and budgets replaces them (at "
                         "default speeds and links); give one of the two.")  # fmt: skip
