"""The fedlora ServerApp (Flower glue): resolve the run config, then hand over to the round loop.

Config sources, in order: the JSON file named by ``FEDLORA_CONFIG_FILE`` (written by
``fedlora simulate``); otherwise Flower run-config, where ``scenario`` names a TOML file
(relative paths resolve against the app directory) and every other key is an override
such as ``num-server-rounds`` or ``train.lr``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlora.config import ConfigError, RunConfig, from_json, load_toml, with_overrides
from server.grid import PollingGrid
from server.loop import ServerRun
from server.outputs import default_run_dir
from server.resume import run_config_of
from server.simulation_size import fit_to_simulation

CONFIG_ENV = "FEDLORA_CONFIG_FILE"
APP_DIR = Path(__file__).resolve().parent.parent

app = ServerApp()


def config_from_run_config(run_config: Mapping[str, Any]) -> RunConfig:
    """Build the run config from Flower run-config (see module docstring).

    Keys whose value is empty, zero or false are "unset" and leave the scenario's value;
    ``overrides`` holds space-separated ``section.key=value`` pairs.
    """
    values = dict(run_config)
    scenario = str(values.pop("scenario", "") or "")
    extra = str(values.pop("overrides", "") or "")
    base = RunConfig()
    own = run_config_of(values["out-dir"]) if values.get("resume") and values.get("out-dir") else None
    if own is not None:  # resuming: the run's own configuration; the other keys are changes to it
        base = own
    elif scenario:
        path = Path(scenario)
        base = load_toml(path if path.is_absolute() else APP_DIR / path)
    overrides = {k: v for k, v in values.items() if v not in ("", 0, 0.0, False)}
    for item in extra.split():
        if "=" not in item:
            raise ConfigError(f"run-config overrides item {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        overrides[key] = value
    return with_overrides(base, overrides)


def resolve_config(context: Context) -> RunConfig:
    """Return the run config for this ServerApp invocation."""
    path = os.environ.get(CONFIG_ENV)
    if path:
        return from_json(Path(path).read_text(encoding="utf-8"))
    return config_from_run_config(context.run_config)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run a federated LoRA fine-tuning."""
    cfg = resolve_config(context)
    if not os.environ.get(CONFIG_ENV):  # flwr run: a local simulation has the nodes it has
        cfg = fit_to_simulation(cfg, grid, context.run_config)
    run_dir = Path(cfg.output.out_dir) if cfg.output.out_dir else default_run_dir()
    if not isinstance(grid, PollingGrid):  # Flower's own grid pulls replies every 3 s
        grid = PollingGrid(grid)
    ServerRun(grid, cfg, run_dir).run()
    print(f"results in {run_dir.resolve()}", flush=True)
