"""The Flower app: the ServerApp and ClientApp a Flower deployment loads (pyproject's
`[tool.flwr.app.components]`). The ServerApp runs a whole hsplitlora run as the driver, with the
Grid Flower gives it, its settings from the run config (`load`): `flwr run flower --run-config
"strategy='hsplitlora' rounds=3"`, the app being flower/pyproject.toml."""

from __future__ import annotations

from flwr.serverapp import ServerApp

from hsplitlora.engines.flower_engine import ACTIVE_GRID
from hsplitlora.engines.flower_engine import client_app as make_client_app

server_app = ServerApp()
client_app = make_client_app()  # to be run by engines/flower_worker.py: it keeps its hosts across messages


def load(values):
    """The RunConfig of a Flower run config (engines/flower_settings.py): the YAML file
    `config-file` names (on the ServerApp's machine) as `hsplitlora run --config` reads it, then
    every key whose value differs from the app's default as a flag would set the setting of that
    name (dashes read as underscores; an empty string is not set, a list comma-separated, a mapping
    JSON), checked as `run` checks them."""
    from hsplitlora.checks import load_config
    from hsplitlora.engines.flower_settings import settings

    path, given = settings(values)
    return load_config(path, {**given, "engine": "flower"})


@server_app.main()
def main(grid, context) -> None:
    from hsplitlora.rounds import run

    config = load(context.run_config)
    ACTIVE_GRID.append(grid)
    try:
        run(config, log=print, overwrite=True)
    finally:
        ACTIVE_GRID.remove(grid)
