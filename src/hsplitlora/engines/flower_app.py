"""The Flower app: the ServerApp and ClientApp a Flower deployment loads (pyproject's
`[tool.flwr.app.components]`). The ServerApp runs a whole hsplitlora run as the driver, with the
Grid Flower gives it, its settings from the run config (`load`): `flwr run APP --run-config
"strategy='hsplitlora' rounds=3"`."""

from __future__ import annotations

from flwr.serverapp import ServerApp

from hsplitlora.engines.flower_engine import ACTIVE_GRID
from hsplitlora.engines.flower_engine import client_app as make_client_app

server_app = ServerApp()
client_app = make_client_app()  # to be run by engines/flower_worker.py: it keeps its hosts across messages


def load(values):
    """The RunConfig of a Flower run config: the YAML file `config-file` names (on the ServerApp's
    machine) as `hsplitlora run --config` reads it, then every other key as a flag would set the
    setting of that name (dashes read as underscores), checked as `run` checks them."""
    from hsplitlora.checks import load_config

    values = dict(values)
    path = values.pop("config-file", None) or None
    overrides = {key.replace("-", "_"): value for key, value in values.items()}
    return load_config(path, {**overrides, "engine": "flower"})


@server_app.main()
def main(grid, context) -> None:
    from hsplitlora.rounds import run

    config = load(context.run_config)
    ACTIVE_GRID.append(grid)
    try:
        run(config, log=print, overwrite=True)
    finally:
        ACTIVE_GRID.remove(grid)
