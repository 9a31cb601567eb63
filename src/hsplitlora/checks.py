"""The one validation path of a run's settings, for `run`, `compare`, `plan`, resume and the
builders: RunConfig's own checks (types, ranges, names), then those that need the domain (the
devices, the strategy's capabilities, the compression and quantization modes, the dtype, the
placement, the data). config.py stays below them all; this module sits above them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hsplitlora.compression import check_mode
from hsplitlora.config import RunConfig, make_config, read_settings, refuse_ignored
from hsplitlora.data.records import data_files
from hsplitlora.data.sources import check_data_settings, refuse_ignored_data_settings
from hsplitlora.devices import PRESETS, resolve_devices
from hsplitlora.errors import UsageError
from hsplitlora.lora.quant import check_quant
from hsplitlora.models.loading import torch_dtype
from hsplitlora.placement import placement
from hsplitlora.strategies.checks import check_strategy_settings


def check(config: RunConfig, given: set[str] | None = None) -> RunConfig:
    """Raise UsageError on the first bad value; with `given` (the settings the file or a flag
    set), also on one that the others would ignore. Returns `config`."""
    config.validate()
    if config.device_preset not in PRESETS:
        raise UsageError(f"device preset {config.device_preset!r} is unknown; choose one of {', '.join(PRESETS)}.")
    resolve_devices(config.clients, config.budgets, config.device_preset, config.devices)
    check_mode(config.compression)
    check_quant(config.client_quant, "client_quant")
    check_quant(config.server_quant, "server_quant")
    check_strategy_settings(config, given)
    check_data_settings(config)
    torch_dtype(config.dtype)
    placement(config.device, config.client_device, config.server_device, check=False)
    if given is not None:
        refuse_ignored_data_settings(config, given)
        refuse_ignored(config, given)
    return config


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file's keys, then explicit overrides (CLI flags), checked."""
    values = read_settings(path, overrides)
    given = set(values)  # what the file or a flag set, as opposed to a default
    if values.get("client_data") and "clients" not in values and isinstance(values["client_data"], str):
        values["clients"] = len(data_files(values["client_data"]))  # one client per file
    return check(make_config(values), given)
