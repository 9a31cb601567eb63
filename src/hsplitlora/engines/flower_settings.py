"""hsplitlora's settings as a Flower app's run config, both ways, written from RunConfig so the two
cannot drift: `app_pyproject` writes the app's pyproject.toml (every setting under its flag's name,
`local-steps` for local_steps, with its default; `config-file` for a YAML file; `resume` and
`overwrite`, as `hsplitlora run` takes them), and `settings` reads a Flower run config back into
settings by name (`options`: the file and the two switches).

Flower's run config holds only booleans, integers, floats and strings, so three conventions:
an empty string is "not set" (None), a list is one comma-separated string (`targets = "q,k,v,o"`),
and a mapping is its JSON text (`devices = '{"0": {"budget": "1GB"}}'`).

The committed app is flower/pyproject.toml; after a setting changes in RunConfig, write it again:

    .venv/bin/python -m hsplitlora.engines.flower_settings flower/pyproject.toml
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from hsplitlora.config import FLOWER, RunConfig
from hsplitlora.errors import UsageError

CONFIG_FILE = "config-file"  # a YAML config file on the ServerApp's machine, read before the other keys
# What the app's run takes besides settings, with its default: the YAML file, and `run`'s --resume
# (continue the run in output-dir from its last checkpoint: a ServerApp stopped part-way) and
# --overwrite (replace the run already in output-dir; without it a second run there is refused).
OPTIONS = {CONFIG_FILE: "", "resume": False, "overwrite": False}
APP_DEFAULTS = {"engine": FLOWER}  # a Flower app runs the Flower engine; every other default is RunConfig's
COMMITTED_APP = "flower/pyproject.toml"  # from the repository's root


def key(name: str) -> str:
    """A setting's key in the run config: its flag's name (dashes for underscores)."""
    return name.replace("_", "-")


def defaults() -> dict[str, Any]:
    """Every setting by name with the value a Flower app starts from."""
    values = {f.name: getattr(RunConfig(), f.name) for f in dataclasses.fields(RunConfig)}
    return {**values, **APP_DEFAULTS}


def _toml(value: Any) -> str:
    """A setting's value as a TOML scalar, by the conventions of the module's docstring."""
    if value is None:
        value = ""
    elif isinstance(value, list | tuple):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, dict):
        value = json.dumps(value, sort_keys=True)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a TOML basic string: JSON's escapes are TOML's


def app_config(overrides: dict[str, Any] | None = None) -> str:
    """The `[tool.flwr.app.config]` table: every setting with its default, `overrides` (settings
    by name) over them."""
    values = defaults()
    options = {name.replace("-", "_"): value for name, value in OPTIONS.items()}
    unknown = sorted(set(overrides or {}) - set(values) - set(options))
    if unknown:
        raise UsageError(f"unknown setting {unknown[0]!r}; valid settings are {', '.join(sorted(values))}.")
    values = {**options, **values, **(overrides or {})}
    return "[tool.flwr.app.config]\n" + "".join(f"{key(name)} = {_toml(v)}\n" for name, v in values.items())


def app_pyproject(overrides: dict[str, Any] | None = None) -> str:
    """A Flower app's pyproject.toml: hsplitlora's ServerApp and ClientApp, and every setting as its
    run config (`overrides` over the defaults). hsplitlora itself must be installed where it runs."""
    return (
        "# hsplitlora as a Flower app (docs/deployment.md). Written by hsplitlora.engines.flower_settings\n"
        "# from RunConfig; tests/test_flower_app.py fails when it differs. Write it again with\n"
        f"#     .venv/bin/python -m hsplitlora.engines.flower_settings {COMMITTED_APP}\n"
        "# Run config conventions: an empty string is 'not set', a list is comma-separated, a mapping is JSON.\n\n"
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "hsplitlora-flower"\nversion = "1.0.0"\n'
        'description = "HSplitLoRA split federated LoRA fine-tuning as a Flower app"\nlicense = "Apache-2.0"\n'
        "dependencies = []  # hsplitlora, installed beside Flower (nothing is installed at run time)\n\n"
        '[tool.flwr.app]\npublisher = "hsplitlora"\n\n'
        '[tool.flwr.app.components]\nserverapp = "hsplitlora.engines.flower_app:server_app"\n'
        'clientapp = "hsplitlora.engines.flower_app:client_app"\n\n'
        f"{app_config(overrides)}"
    )


def _allows(hint, kind) -> bool:
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    return any(o is kind or typing.get_origin(o) is kind for o in options)


def _list_item(hint):
    """The item type of the list a setting of type `hint` may be."""
    origin = typing.get_origin(hint)
    options = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    return next(typing.get_args(o)[0] for o in options if typing.get_origin(o) is list)


def _read(name: str, value: Any, hint) -> Any:
    """A run config value as the setting `name` (of type `hint`) takes it."""
    if not isinstance(value, str):
        return value
    if value == "" and _allows(hint, type(None)):
        return None
    if _allows(hint, dict) and not _allows(hint, str):
        try:
            mapping = json.loads(value)
        except json.JSONDecodeError:
            mapping = None
        if not isinstance(mapping, dict):
            raise UsageError(f"{key(name)} takes a mapping as JSON text, e.g. '{{\"0\": {{\"budget\": \"1GB\"}}}}'; "
                             f"got {value!r}.")  # fmt: skip
        return mapping
    if _allows(hint, list) and not _allows(hint, str):
        items = [item.strip() for item in value.split(",")]
        if not all(items):
            raise UsageError(f"{key(name)} takes comma-separated values, e.g. '2,4'; got {value!r}.")
        if _list_item(hint) is int:
            try:
                numbers = [int(item) for item in items]
            except ValueError:
                raise UsageError(f"{key(name)} takes comma-separated integers, e.g. '2,4'; got {value!r}.") from None
            return numbers[0] if len(numbers) == 1 and _allows(hint, int) else numbers
        return items
    return value


def settings(run_config: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """A Flower run config as (the YAML config file it names or None, the settings it gives by name).
    A value equal to the app's default is left out: it is there because the app lists every
    setting, not because anyone gave it (so it neither overrides the config file nor counts as given)."""
    hints = typing.get_type_hints(RunConfig)
    start = defaults()
    values = {name: value for name, value in run_config.items() if name not in OPTIONS}
    path = options(run_config)[CONFIG_FILE]
    given: dict[str, Any] = {}
    for raw, value in values.items():
        name = raw.replace("-", "_")
        if name not in hints:
            raise UsageError(f"unknown setting {raw!r} in the run config; valid settings are "
                             f"{', '.join(sorted(key(n) for n in hints))}, and {', '.join(OPTIONS)}.")  # fmt: skip
        value = _read(name, value, hints[name])
        if value != start[name] or type(value) is not type(start[name]):
            given[name] = value
    engine = given.pop("engine", FLOWER)
    if engine != FLOWER:
        raise UsageError(
            f"engine is {engine!r}, and a Flower app runs the Flower engine; drop engine or give 'flower'."
        )
    return path, given


def options(run_config: dict[str, Any]) -> dict[str, Any]:
    """The run's options in a Flower run config (OPTIONS; the config file None when not given),
    each checked for its type."""
    found = {name: run_config.get(name, default) for name, default in OPTIONS.items()}
    for name in ("resume", "overwrite"):
        if not isinstance(found[name], bool):
            raise UsageError(f"{name} takes true or false; got {found[name]!r}.")
    if not isinstance(found[CONFIG_FILE], str):
        raise UsageError(f"{CONFIG_FILE} takes a path on the ServerApp's machine; got {found[CONFIG_FILE]!r}.")
    return {**found, CONFIG_FILE: found[CONFIG_FILE] or None}


def main() -> None:
    import sys

    if len(sys.argv) != 2:
        raise SystemExit(f"usage: python -m hsplitlora.engines.flower_settings PYPROJECT (e.g. {COMMITTED_APP})")
    Path(sys.argv[1]).write_text(app_pyproject())


if __name__ == "__main__":
    main()
