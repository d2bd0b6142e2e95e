"""``fedlora simulate``: run the ServerApp and many virtual ClientApps on one machine.

Uses Flower's Simulation Engine (Ray backend). The resolved config is written to the run
directory and handed to the ServerApp through ``FEDLORA_CONFIG_FILE``; clients receive it
inside every message, so the same apps run unchanged under ``flwr run`` and on SuperNodes.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from fedlora.config import RunConfig
from fedlora.data.cached import partitions, task_data
from fedlora.data.partition import format_summary, save_summary, summarize

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "default.toml"

# Clients listed one per line in the data summary; more are summarised in one line.
MAX_SUMMARY_ROWS = 12


class SimulationError(RuntimeError):
    """The simulation did not complete; the message points at the cause."""


def check_runnable(cfg: RunConfig) -> None:
    """Refuse an unknown strategy or an unloadable model before any data loads or Ray starts.

    Raises
    ------
    ValueError
        ``RegistryError`` for the strategy (listing the valid names and parameters),
        ``ModelError`` for the model (saying what a model name may be).
    """
    from fedlora.models import ModelError, resolve_model_path
    from strategies.registry import create

    create(cfg.federation.strategy, **dict(cfg.federation.strategy_params))
    path = resolve_model_path(cfg.model.name)
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
        return
    except (OSError, ValueError) as err:
        local_error = err
    if Path(path).exists():
        raise ModelError(f"model directory {path!r} cannot be loaded: {local_error}") from local_error
    if not _hub_reachable():
        raise ModelError(
            f"model {cfg.model.name!r} is neither 'minilm' (the packaged model), a local model "
            "directory, nor a hub id in the Hugging Face cache, and huggingface.co cannot be reached; "
            "pass --model minilm or a local Hugging Face model directory"
        ) from local_error
    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ModelError(
            f"model {cfg.model.name!r} cannot be loaded from the Hugging Face hub: {err}"
        ) from err


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Return whether huggingface.co resolves and accepts a connection (hub downloads would work)."""
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def prepare_run_dir(cfg: RunConfig) -> tuple[RunConfig, Path]:
    """Return the config with an absolute ``output.out_dir`` and that directory (created)."""
    from server.outputs import default_run_dir

    run_dir = Path(cfg.output.out_dir) if cfg.output.out_dir else default_run_dir()
    run_dir = run_dir.resolve()
    if run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.resume:
        if (run_dir / "metrics.jsonl").exists():
            raise SimulationError(
                f"{run_dir} already holds a run; pass --resume to continue it or a new --out"
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    return replace(cfg, output=replace(cfg.output, out_dir=str(run_dir))), run_dir


def print_partitions(cfg: RunConfig, run_dir: Path) -> None:
    """Print and save the per-client data summary (what each virtual client will hold)."""
    data = task_data(cfg.data, cfg.model.task)
    summary = summarize(partitions(cfg.data, cfg.model.task, cfg.federation.num_clients), data.labels)
    save_summary(summary, run_dir / "partitions.json")
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
        f"run directory: {run_dir}"
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


def _server_app_with_progress(progress: Any, num_rounds: int) -> Any:
    """Return a ServerApp that runs fedlora's, with a grid that reports replies to ``progress``."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp

    from server.app import main as server_main
    from simulations.console import ProgressGrid

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        server_main(ProgressGrid(grid, progress, num_rounds), context)

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

    Raises
    ------
    ValueError
        For an unknown strategy or a model that cannot be loaded, before any data is loaded.
    SimulationError
        If the run ended without its final adapter.
    """
    check_runnable(cfg)
    from fedlora.derive import derive_config

    cfg, derived = derive_config(cfg, check=True)  # task and max_length from the model and the data
    from simulations.console import LiveProgress, print_summary, quiet_environment

    logs = quiet_environment(verbosity)
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from clients.privacy import STATE_ROOT_ENV
    from server.app import CONFIG_ENV

    cfg, run_dir = prepare_run_dir(cfg)
    config_file = run_dir / "resolved_config.json"
    config_file.write_text(cfg.to_json(), encoding="utf-8")
    console = Console()
    print(_header(cfg, run_dir, ray_address), flush=True)
    for note in derived:
        print(f"derived: {note}", flush=True)
    print_partitions(cfg, run_dir)
    backend = _backend_config(cfg, cpus_per_client, gpus_per_client, ray_address, logs)
    progress = LiveProgress(console)
    os.environ[CONFIG_ENV] = str(config_file)
    os.environ[STATE_ROOT_ENV] = str(run_dir / "nodes")  # inherited by the Ray actors (clients)
    t0 = time.perf_counter()
    try:
        where = f"joining Ray at {ray_address}" if ray_address else "starting Ray"
        progress.phase(f"{where} and {cfg.federation.num_clients} virtual clients", total=None)
        run_simulation(
            server_app=_server_app_with_progress(progress, cfg.federation.num_rounds),
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend,
            verbose_logging=logs["verbose_logging"],
        )
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
