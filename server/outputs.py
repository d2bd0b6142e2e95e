"""The run directory: resolved config, metrics.jsonl (round records), progress lines, the learning-curve plot.

Everything is written owner-only (files 0600, directories 0700): metrics name nodes and
the privacy they spent.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedlora.atomic import append_line, atomic_write, atomic_write_text, owned_dir
from fedlora.config import RunConfig, to_toml
from fedlora.tracking import Trackers

#: Generation samples per evaluated round (causal LM), written by ``server.evaluator``.
SAMPLES_FILE = "samples.jsonl"


def default_run_dir() -> Path:
    """Return ``runs/<timestamp>`` (local time, seconds resolution)."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class OutputError(RuntimeError):
    """The run directory cannot be used as asked (e.g. it already holds a run and resume is off)."""


@dataclass
class RoundRecord:
    """One round's global line in metrics.jsonl (underscore keys, like every metrics.jsonl key).

    ``rejected`` lists ``{"node", "reason"}`` for every update left out; ``clipped`` lists
    updates the norm bound shrank (``node``, ``norm``, ``bound``, ``factor``). ``seconds`` is
    the whole round (sending, training, aggregation and server evaluation), ``eval_seconds``
    the server evaluation in it; ``test_*`` are None in rounds the server did not evaluate
    (``output.eval_every``, ``output.eval_initial``).
    """

    round: int
    test_accuracy: float | None
    test_loss: float | None
    train_loss: float | None = None
    clients_sampled: int = 0
    clients_ok: int = 0
    rejected: list[dict[str, Any]] = field(default_factory=list)
    clipped: list[dict[str, Any]] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    eval_seconds: float = 0.0
    extra: Mapping[str, Any] = field(default_factory=dict)  # privacy summary (dp_epsilon ...)

    def row(self) -> dict[str, Any]:
        """Return the metrics.jsonl row (``kind: global``)."""
        fields = {k: v for k, v in asdict(self).items() if k != "extra"}
        return {**dict(self.extra), **fields, "kind": "global"}


RUN_MARKERS = ("metrics.jsonl", "checkpoint.pt", "checkpoint.pt.prev")


class RunOutputs:
    """Append-only writer of a run's files (owner-only); every line is flushed so a crash loses nothing.

    Raises
    ------
    OutputError
        When ``run_dir`` already holds a run (metrics or a checkpoint, links included) and
        ``resume`` is off: the run is never silently overwritten (the same rule as ``fedlora
        simulate``).
    fedlora.atomic.UnsafeDirectoryError
        When ``run_dir`` is a link, another user's, or writable by others (:func:`~fedlora.atomic.owned_dir`).
    """

    def __init__(self, run_dir: Path, cfg: RunConfig, *, resume: bool = False) -> None:
        self.dir = run_dir
        owned_dir(self.dir)  # before anything is read or written there
        held = [m for m in RUN_MARKERS if os.path.lexists(run_dir / m)]
        if held and not resume:
            raise OutputError(
                f"{run_dir} already holds a run ({', '.join(held)}); set resume=true to continue it "
                "or choose another out-dir"
            )
        self.cfg = cfg
        self.metrics_path = self.dir / "metrics.jsonl"
        self.trackers = Trackers(cfg.output.report_to, run_dir, cfg.to_dict())  # --report-to

    def write_config(self) -> None:
        """Write the resolved ``config.toml`` (after a resume's checks passed: a refused one leaves it)."""
        atomic_write_text(self.dir / "config.toml", to_toml(self.cfg))

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl (created 0600, never through a link)."""
        append_line(self.metrics_path, json.dumps(record, sort_keys=True) + "\n")
        self.trackers.log(record)

    def log_round(self, record: RoundRecord) -> dict[str, Any]:
        """Append a round's global line and return it."""
        row = record.row()
        self.log(row)
        return row

    def truncate_after(self, last_round: int) -> None:
        """Drop metric and sample lines of rounds after ``last_round`` (a resumed run redoes them)."""
        for path in (self.metrics_path, self.dir / SAMPLES_FILE):
            if not path.exists():
                continue
            keep = [
                line
                for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line).get("round", 0) <= last_round
            ]
            atomic_write_text(path, "".join(line + "\n" for line in keep))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl into a list of dicts."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _num(value: float | None, width: int = 5) -> str:
    return "-".center(width) if value is None else f"{value:.3f}"


def score_text(rec: Mapping[str, Any], task: str = "classification") -> str:
    """Return the held-out score of a metrics row, named for what it is.

    Classification: ``test acc`` (label accuracy). Causal LM: ``exact match`` (greedy answers
    equal to the reference), ``token acc`` (next-token accuracy on the reference responses, what
    ``test_accuracy`` holds there) and ``ppl`` (response perplexity).
    """
    acc = rec.get("test_accuracy")
    if task != "causal-lm":
        return f"test acc {_num(acc)}"
    ppl = rec.get("test_perplexity")
    return (
        f"exact match {_num(rec.get('test_exact_match'))}  token acc {_num(acc)}  "
        f"ppl {'  -  ' if ppl is None else f'{ppl:.2f}'}"
    )


def progress_line(rec: Mapping[str, Any], num_rounds: int, task: str = "classification") -> str:
    """Render one global metrics record as a progress line (``task``: the run's ``model.task``)."""
    loss, test_loss = rec.get("train_loss"), rec.get("test_loss")
    return (
        f"round {rec['round']:>3}/{num_rounds}  "
        f"train loss {'   -  ' if loss is None else f'{loss:6.3f}'}  "
        f"{score_text(rec, task)}  "
        f"test loss {'  -  ' if test_loss is None else f'{test_loss:.3f}'}  "
        f"clients {rec.get('clients_ok', 0)}/{rec.get('clients_sampled', 0)}  "
        f"up {rec.get('bytes_up', 0) / 1e6:6.2f} MB  down {rec.get('bytes_down', 0) / 1e6:6.2f} MB  "
        f"{rec.get('seconds', 0.0):6.1f} s"
    )


def plot_metrics(metrics_path: Path, out_png: Path) -> Path:
    """Plot held-out accuracy and losses per round to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    every = [r for r in read_metrics(metrics_path) if r.get("kind") == "global"]
    rows = [r for r in every if r.get("test_accuracy") is not None]  # the evaluated rounds
    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
    ax1.set(xlabel="round", ylabel="held-out accuracy", title="Global adapter accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="held-out loss")
    train = [(r["round"], r["train_loss"]) for r in every if r.get("train_loss") is not None]
    if train:
        ax2.plot(*zip(*train, strict=True), marker="s", label="client train loss")
    ax2.set(xlabel="round", ylabel="loss", title="Loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write(out_png, buffer.getvalue())  # replaces a link at out_png, never follows it
