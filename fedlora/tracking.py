"""Send a run's metrics where users already look: TensorBoard, MLflow, Weights & Biases.

``--report-to tensorboard,mlflow,wandb`` (the Hugging Face Trainer's convention; several
allowed) mirrors every line the server writes to ``metrics.jsonl``
(:meth:`server.outputs.RunOutputs.log`): each round's global metrics (held-out loss and
accuracy, ε, bytes up and down, seconds) at step = round, and each client's metrics under
``client/<partition>/...``. Under DP the clients' lines hold only what their privacy mode lets
leave the node (``clients/privacy.py`` strips the rest before the reply), so nothing more is
reported here than the run directory already holds.

* TensorBoard: event files in ``<run>/tensorboard`` (``tensorboard --logdir <run>/tensorboard``).
* MLflow: a local file store ``<run>/mlruns`` (``MLFLOW_ALLOW_FILE_STORE=true mlflow ui
  --backend-store-uri <run>/mlruns``; MLflow 3 asks for that opt-in), or the server in
  ``MLFLOW_TRACKING_URI`` when set; experiment ``fedlora``.
* W&B: offline in ``<run>/wandb`` (``wandb sync`` uploads it later) unless ``WANDB_MODE`` says
  otherwise; project ``fedlora``.

Each is an optional extra; a missing one is refused before the run starts, with the command
that installs it (:func:`check_reporters`).
"""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.config import REPORT_TO as REPORTERS

# The import that must work, and the exact install command (the pins of pyproject's extras).
REQUIRES = {
    "tensorboard": ("tensorboard", "pip install tensorboard==2.21.0"),
    "mlflow": ("mlflow", "pip install mlflow-skinny==3.17.2"),
    "wandb": ("wandb", "pip install wandb==0.30.0"),
}


class TrackingError(ValueError):
    """An unknown reporter, or one whose package is not installed (the message says how to install it)."""


def check_reporters(names: Sequence[str]) -> None:
    """Refuse unknown reporter names and reporters whose package is missing.

    Raises
    ------
    TrackingError
        Naming the reporter and the install command (``pip install -e '.[NAME]'`` also works
        from a checkout).
    """
    for name in names:
        if name not in REQUIRES:
            raise TrackingError(f"unknown --report-to {name!r}: use some of {', '.join(REPORTERS)}")
        module, command = REQUIRES[name]
        if importlib.util.find_spec(module) is None:
            raise TrackingError(
                f"--report-to {name} needs the {module} package, which is not installed: {command} "
                f"(or pip install -e '.[{name}]' in a fedlora checkout)"
            )


def scalars(record: Mapping[str, Any]) -> tuple[int, dict[str, float]]:
    """Return (step, {tag: value}) of one metrics.jsonl line: its finite numbers, nested ones by path.

    A global line's fields keep their names (``test_loss``, ``dp_epsilon_max``, ``bytes_up``);
    a client line's go under ``client/<partition>/``.
    """
    step = int(record.get("round", 0) or 0)
    prefix = ""
    if record.get("kind") == "client":
        prefix = f"client/{record.get('partition', record.get('node', '?'))}/"
    out: dict[str, float] = {}

    def walk(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{key}/{k}" if key else str(k), v)
        elif isinstance(value, bool):
            return
        elif isinstance(value, int | float) and math.isfinite(value) and key not in ("round",):
            out[prefix + key] = float(value)

    walk("", {k: v for k, v in record.items() if k not in ("kind", "round", "partition", "node")})
    return step, out


class Trackers:
    """The run's open reporters; :meth:`log` takes every metrics.jsonl line, :meth:`close` ends them."""

    def __init__(self, names: Sequence[str], run_dir: Path, config: Mapping[str, Any] | None = None) -> None:
        check_reporters(names)
        self.sinks: list[Any] = []
        flat = _flatten(config or {})
        for name in names:
            self.sinks.append(
                {"tensorboard": _TensorBoard, "mlflow": _MLflow, "wandb": _Wandb}[name](run_dir, flat)
            )

    def log(self, record: Mapping[str, Any]) -> None:
        """Report the numbers of one metrics line (``kind`` global or client; others are skipped)."""
        if record.get("kind") not in ("global", "client") or not self.sinks:
            return
        step, values = scalars(record)
        if values:
            for sink in self.sinks:
                sink.log(step, values)

    def close(self) -> None:
        """Flush and end every reporter (idempotent)."""
        for sink in self.sinks:
            sink.close()
        self.sinks = []


def _flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in config.items():
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = str(v)[:250]
    return out


class _TensorBoard:
    def __init__(self, run_dir: Path, config: Mapping[str, str]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k} = {v}" for k, v in sorted(config.items())))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _MLflow:
    def __init__(self, run_dir: Path, config: Mapping[str, str]) -> None:
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:  # a local file store: MLflow 3 keeps it behind an opt-in (maintenance mode)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (run_dir / "mlruns").resolve().as_uri()
        self.client = MlflowClient(tracking_uri=uri)
        found = self.client.get_experiment_by_name("fedlora")
        experiment = found.experiment_id if found else self.client.create_experiment("fedlora")
        self.run_id = self.client.create_run(experiment, run_name=run_dir.name).info.run_id
        for key, value in config.items():
            self.client.log_param(self.run_id, key, value)

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for tag, value in values.items():
            self.client.log_metric(self.run_id, tag, value, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


class _Wandb:
    def __init__(self, run_dir: Path, config: Mapping[str, str]) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", "offline")
        self.run = wandb.init(
            project="fedlora",
            dir=str(run_dir),
            mode=mode,
            config=dict(config),
            name=run_dir.name,
            reinit=True,
        )

    def log(self, step: int, values: Mapping[str, float]) -> None:
        self.run.log(dict(values), step=step)

    def close(self) -> None:
        self.run.finish()
