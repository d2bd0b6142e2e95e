"""``fedlora simulate``: run the ServerApp and many virtual ClientApps on one machine.

Uses Flower's Simulation Engine (Ray backend). The resolved config is written to the run
directory and handed to the ServerApp through ``FEDLORA_CONFIG_FILE``; clients receive it
inside every message, so the same apps run unchanged under ``flwr run`` and on SuperNodes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.config import ConfigError, RunConfig
from fedlora.data.cached import partitions, task_data
from fedlora.data.partition import format_summary, save_summary, summarize
from simulations.preflight import check_runnable

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "default.toml"

# Under DP the result lines show train loss "-": said once, in the header.
DP_LOSS_NOTE = (
    "\ntrain loss: '-' under DP: clients send no loss (it is not covered by the guarantee); "
    "the held-out scores are the server's own"
)
# Clients listed one per line in the data summary; more are summarised in one line.
MAX_SUMMARY_ROWS = 12


class SimulationError(RuntimeError):
    """The simulation did not complete; the message points at the cause."""


def resolve_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """Return the config with an absolute ``output.out_dir`` and that directory (not created yet).

    Raises
    ------
    ConfigError
        When the directory already holds a run and ``output.resume`` is off.
    """
    from server.outputs import RUN_MARKERS, default_run_dir

    run_dir = (Path(cfg.output.out_dir) if cfg.output.out_dir else default_run_dir()).resolve()
    held = [m for m in RUN_MARKERS if os.path.lexists(run_dir / m)]
    if held and not cfg.output.resume:
        raise ConfigError(
            f"{run_dir} already holds a run ({', '.join(held)}); pass --resume to continue it or a new --out"
        )
    return replace(cfg, output=replace(cfg.output, out_dir=str(run_dir))), run_dir


def partition_summary(cfg: RunConfig) -> list[dict[str, Any]]:
    """Return the per-client data summary (loads and partitions the data; writes nothing)."""
    data = task_data(cfg.data, cfg.model.task)
    return summarize(partitions(cfg.data, cfg.model.task, cfg.federation.num_clients), data.labels)


def print_partitions(cfg: RunConfig, summary: list[dict[str, Any]]) -> None:
    """Print the per-client data summary (what each virtual client will hold)."""
    data = task_data(cfg.data, cfg.model.task)
    labels = f"{len(data.labels)} labels ({', '.join(data.labels)})" if data.labels else "no labels"
    print(f"data: {len(data.train)} train / {len(data.test)} held-out records, {labels}")
    lines = format_summary(summary).splitlines()
    if len(lines) > MAX_SUMMARY_ROWS + 1:
        sizes = sorted(int(s["size"]) for s in summary)
        hidden = len(lines) - 1 - MAX_SUMMARY_ROWS
        lines = [
            *lines[: MAX_SUMMARY_ROWS - 1],
            f"   ...  ({hidden} more clients; sizes {sizes[0]}..{sizes[-1]}, all in partitions.json)",
            lines[-1],
        ]
    print("\n".join(lines), flush=True)


def _header(cfg: RunConfig, run_dir: Path, ray_address: str | None) -> str:
    fed, lora, dp = cfg.federation, cfg.lora, cfg.privacy
    ranks = f"ranks {','.join(map(str, lora.ranks))}" if lora.ranks else f"rank {lora.rank}"
    privacy = (
        "no DP"
        if dp.mode == "none"
        else f"{dp.mode}-level DP"
        + (f" (target ε {dp.epsilon:g})" if dp.epsilon else f" (noise {dp.noise_multiplier:g})")
    )
    where = f"Ray cluster {ray_address}" if ray_address else "this machine"
    return (
        f"fedlora simulate: {fed.num_clients} clients x {fed.num_rounds} rounds of {fed.strategy} "
        f"on {where}; "
        f"model {cfg.model.name} ({cfg.model.task}, max_length {cfg.model.max_length}), "
        f"LoRA {ranks}, {privacy}\n"
        f"run directory: {run_dir}" + (DP_LOSS_NOTE if dp.mode != "none" else "")
    )


def _backend_config(
    cfg: RunConfig, cpus_per_client: float, gpus_per_client: float, ray_address: str | None, logs: dict
) -> dict:
    """Return Flower's Ray backend config (``init_args`` go to ``ray.init``)."""
    import torch

    n_cpus = os.cpu_count() or 1
    if gpus_per_client == 0.0 and torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        gpus_per_client = 1.0 / min(cfg.federation.num_clients, 4)
    init_args: dict = {"include_dashboard": False, **logs["init_args"]}
    if ray_address:
        # An existing cluster brings its own resources: ray.init refuses num_cpus with an address.
        init_args["address"] = ray_address
    else:
        init_args["num_cpus"] = n_cpus
    return {
        "client_resources": {"num_cpus": cpus_per_client or n_cpus, "num_gpus": gpus_per_client},
        "init_args": init_args,
    }


def _server_app_with_progress(
    progress: Any, num_rounds: int, stop: threading.Event, done: threading.Event
) -> Any:
    """Return a ServerApp that runs fedlora's on a grid that reports replies to ``progress``.

    The grid raises once ``stop`` is set (Ctrl-C, :mod:`simulations.interrupt`); ``done`` is
    set when the ServerApp returns or raises.
    """
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from server.app import main as server_main
    from simulations.console import ProgressGrid

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server_main(ProgressGrid(grid, progress, num_rounds, stop=stop), context)
        finally:
            done.set()

    return app


def simulate(
    cfg: RunConfig,
    cpus_per_client: float = 0.0,
    gpus_per_client: float = 0.0,
    *,
    verbosity: int | None = None,
    ray_address: str | None = None,
) -> Path:
    """Run a simulation for ``cfg``; return the run directory.

    ``cpus_per_client = 0`` gives each virtual client all CPUs of this machine (one client
    trains at a time, using every core), which is fastest for transformer training on small
    machines. ``verbosity`` is the CLI's ``-v`` count (``None``: a library call that keeps the
    caller's logging set-up). ``ray_address`` joins an existing Ray cluster (``ray start
    --head`` there) instead of starting a private one; every node of it needs fedlora
    installed.

    Everything that can be refused is checked before the run directory is created or touched
    (:func:`simulations.preflight.check_runnable`, the data, a resume's configuration), so a
    refused command changes nothing on disk.

    Raises
    ------
    ValueError
        For an unknown strategy, a model that cannot be loaded, an unreachable ``ray_address``
        (before any data is loaded), data that cannot be used, or a resume that would mix runs.
    SimulationError
        If the run ended without its final adapter.
    simulations.interrupt.Interrupted
        On Ctrl-C (a ``KeyboardInterrupt``): the ServerApp stopped and Ray shut down; the last
        complete round's checkpoint is in the run directory.
    """
    check_runnable(cfg, ray_address)
    cfg, run_dir = resolve_run_dir(cfg)
    from fedlora.tracking import check_reporters

    check_reporters(cfg.output.report_to)  # a missing extra is refused with its install command
    from fedlora.derive import derive_config

    cfg, derived = derive_config(cfg, check=True)  # task and max_length from the model and the data
    if cfg.output.resume:
        from server.resume import check_resume

        check_resume(run_dir, cfg)  # refuses a resume that would mix two runs, before anything is written
    summary = partition_summary(cfg)
    from simulations.console import LiveProgress, print_summary, quiet_environment

    logs = quiet_environment(verbosity)
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from clients.privacy import STATE_ROOT_ENV
    from fedlora.atomic import owned_dir
    from server.app import CONFIG_ENV
    from simulations.interrupt import Interrupted, interruptible, last_checkpoint_round, wind_down

    # The run starts here: its directory and first files.
    owned_dir(run_dir)
    config_file = run_dir / "resolved_config.json"
    config_file.write_text(cfg.to_json(), encoding="utf-8")
    save_summary(summary, run_dir / "partitions.json")
    console = Console()
    print(_header(cfg, run_dir, ray_address), flush=True)
    for note in derived:
        print(f"derived: {note}", flush=True)
    print_partitions(cfg, summary)
    backend = _backend_config(cfg, cpus_per_client, gpus_per_client, ray_address, logs)
    progress = LiveProgress(console)
    os.environ[CONFIG_ENV] = str(config_file)
    os.environ[STATE_ROOT_ENV] = str(run_dir / "nodes")  # inherited by the Ray actors (clients)
    stop, done = threading.Event(), threading.Event()
    t0 = time.perf_counter()
    try:
        with interruptible(stop):
            where = f"joining Ray at {ray_address}" if ray_address else "starting Ray"
            progress.phase(f"{where} and {cfg.federation.num_clients} virtual clients", total=None)
            try:
                run_simulation(
                    server_app=_server_app_with_progress(progress, cfg.federation.num_rounds, stop, done),
                    client_app=client_app,
                    num_supernodes=cfg.federation.num_clients,
                    backend_config=backend,
                    verbose_logging=logs["verbose_logging"],
                )
            except KeyboardInterrupt:
                progress.stop()
                wind_down(stop, done)
                raise Interrupted(run_dir, last_checkpoint_round(run_dir)) from None
            except BaseException:
                wind_down(stop, done)  # else the ServerApp thread waits for nodes that never come
                raise
    finally:
        progress.stop()
        os.environ.pop(CONFIG_ENV, None)
        os.environ.pop(STATE_ROOT_ENV, None)
    if not (run_dir / "adapter" / "adapter_model.safetensors").exists():
        raise SimulationError(
            f"the simulation ended without a final adapter; see the log above and {run_dir}"
        )
    print_summary(console, run_dir, time.perf_counter() - t0)
    return run_dir
