"""``fedlora simulate``: run the ServerApp and many virtual ClientApps on one machine.

Uses Flower's Simulation Engine (Ray backend). The resolved config is written to the run
directory and handed to the ServerApp through ``FEDLORA_CONFIG_FILE``; clients receive it
inside every message, so the same apps run unchanged under ``flwr run`` and on SuperNodes.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import replace
from pathlib import Path

from fedlora.config import RunConfig
from fedlora.data.partition import format_summary, partition_records, save_summary, summarize
from fedlora.data.sources import load_task_data

DEFAULT_SCENARIO = Path(__file__).resolve().parent / "default.toml"


class SimulationError(RuntimeError):
    """The simulation did not complete; the message points at the cause."""


def _quiet() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Inherited by the Ray actors that run the ClientApps.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    for name in ("transformers", "peft", "ray", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("flwr").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


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
    data = load_task_data(cfg.data, cfg.model.task)
    parts = partition_records(data.train, cfg.federation.num_clients, cfg.data)
    summary = summarize(parts, data.labels)
    save_summary(summary, run_dir / "partitions.json")
    print(f"data: {len(data.train)} train / {len(data.test)} held-out records, labels {list(data.labels)}")
    print(format_summary(summary), flush=True)


def simulate(cfg: RunConfig, cpus_per_client: float = 0.0, gpus_per_client: float = 0.0) -> Path:
    """Run a simulation for ``cfg``; return the run directory.

    ``cpus_per_client = 0`` gives each virtual client all CPUs (one client trains at a
    time, using every core), which is fastest for transformer training on small machines.
    """
    _quiet()
    import torch
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import CONFIG_ENV
    from server.app import app as server_app

    cfg, run_dir = prepare_run_dir(cfg)
    config_file = run_dir / "resolved_config.json"
    config_file.write_text(cfg.to_json(), encoding="utf-8")
    print(
        f"fedlora simulate: {cfg.federation.num_clients} clients x {cfg.federation.num_rounds} rounds, "
        f"strategy {cfg.federation.strategy}, model {cfg.model.name}, privacy {cfg.privacy.mode}; "
        f"run dir {run_dir}"
    )
    print_partitions(cfg, run_dir)
    n_cpus = os.cpu_count() or 1
    if gpus_per_client == 0.0 and torch.cuda.is_available() and cfg.train.device in ("auto", "cuda"):
        gpus_per_client = 1.0 / min(cfg.federation.num_clients, 4)
    resources = {"num_cpus": cpus_per_client or n_cpus, "num_gpus": gpus_per_client}
    backend = {
        "client_resources": resources,
        "init_args": {
            "num_cpus": n_cpus,
            "include_dashboard": False,
            "logging_level": "ERROR",
            "log_to_driver": True,
        },
    }
    os.environ[CONFIG_ENV] = str(config_file)
    t0 = time.perf_counter()
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=backend,
        )
    finally:
        os.environ.pop(CONFIG_ENV, None)
    if not (run_dir / "adapter" / "adapter_model.safetensors").exists():
        raise SimulationError(
            f"the simulation ended without a final adapter; see the log above and {run_dir}"
        )
    print(f"done in {time.perf_counter() - t0:.0f} s; results in {run_dir}", flush=True)
    return run_dir
