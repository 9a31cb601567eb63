"""The Flower app: the ServerApp and ClientApp a Flower deployment loads (pyproject's
`[tool.flwr.app.components]`). The ServerApp runs a whole hsplitlora run as the driver, with the
Grid Flower gives it, its settings from the run config (`load`): `flwr run flower --run-config
"strategy='hsplitlora' rounds=3"`, the app being flower/pyproject.toml."""

from __future__ import annotations

from pathlib import Path

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
    from hsplitlora.engines.flower_settings import key, options, settings
    from hsplitlora.errors import UsageError
    from hsplitlora.reporting import read_json
    from hsplitlora.rounds import resume_config

    path, given = settings(values)
    if not options(values)["resume"]:
        return load_config(path, {**given, "engine": "flower"})
    # resume=true continues the run in output-dir with its own settings, as `hsplitlora run --resume
    # RUN_DIR [--rounds N]` does. The app lists every setting, so `rounds` is always there: above the
    # run's own rounds it extends the run, else the run goes to its own end.
    if "output_dir" not in given:
        raise UsageError("resume=true continues the run in output-dir; give output-dir='RUN_DIR'.")
    others = sorted(set(given) - {"output_dir", "rounds"}) + (["config-file"] if path else [])
    if others:
        raise UsageError(f"resume=true continues a run with its own settings; drop {key(others[0])} "
                         "(only output-dir and rounds go with it).")  # fmt: skip
    rounds = values.get("rounds")
    saved = Path(given["output_dir"]) / "config.json"
    own = read_json(saved, "run config").get("rounds") if saved.is_file() else None
    extend = isinstance(rounds, int) and isinstance(own, int) and rounds > own
    return resume_config(given["output_dir"], rounds if extend else None)


@server_app.main()
def main(grid, context) -> None:
    from hsplitlora.engines.flower_local import quicker_object_pulls
    from hsplitlora.engines.flower_settings import options
    from hsplitlora.errors import UsageError
    from hsplitlora.rounds import run

    quicker_object_pulls()  # the clients' replies, pulled as soon as they are there
    config, given = load(context.run_config), options(context.run_config)
    if config.engine != "flower":
        raise UsageError(f"{config.output_dir} is a run of the {config.engine} engine; resume it with hsplitlora run.")
    ACTIVE_GRID.append(grid)
    try:
        # As `hsplitlora run` does: a run already in output-dir is refused unless overwrite (then only
        # the files of that run are replaced) or resume (a ServerApp stopped part-way continues it).
        run(config, log=print, resume=given["resume"], overwrite=given["overwrite"])
    finally:
        ACTIVE_GRID.remove(grid)
