"""The run directory: resolved config, metrics.jsonl, progress lines, and the learning-curve plot."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, to_toml


def default_run_dir() -> Path:
    """Return ``runs/<timestamp>`` (local time, seconds resolution)."""
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")


class RunOutputs:
    """Append-only writer of a run's files; every line is flushed so a crash loses nothing written."""

    def __init__(self, run_dir: Path, cfg: RunConfig, *, resume: bool = False) -> None:
        self.dir = run_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "config.toml").write_text(to_toml(cfg), encoding="utf-8")
        self.metrics_path = self.dir / "metrics.jsonl"
        if not resume and self.metrics_path.exists():
            self.metrics_path.unlink()

    def log(self, record: Mapping[str, Any]) -> None:
        """Append one JSON line to metrics.jsonl."""
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, sort_keys=True) + "\n")

    def truncate_after(self, last_round: int) -> None:
        """Drop metric lines of rounds after ``last_round`` (a resumed run redoes them)."""
        if not self.metrics_path.exists():
            return
        keep = [
            line
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("round", 0) <= last_round
        ]
        self.metrics_path.write_text("".join(line + "\n" for line in keep), encoding="utf-8")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Read metrics.jsonl into a list of dicts."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def progress_line(rec: Mapping[str, Any], num_rounds: int) -> str:
    """Render one global metrics record as a progress line."""
    loss = rec.get("train_loss")
    return (
        f"round {rec['round']:>3}/{num_rounds}  "
        f"train loss {'   -  ' if loss is None else f'{loss:6.3f}'}  "
        f"test acc {rec['test_accuracy']:.3f}  test loss {rec['test_loss']:.3f}  "
        f"clients {rec.get('clients_ok', 0)}/{rec.get('clients_sampled', 0)}  "
        f"up {rec.get('bytes_up', 0) / 1e6:6.2f} MB  down {rec.get('bytes_down', 0) / 1e6:6.2f} MB  "
        f"{rec.get('seconds', 0.0):6.1f} s"
    )


def plot_metrics(metrics_path: Path, out_png: Path) -> Path:
    """Plot held-out accuracy and losses per round to a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in read_metrics(metrics_path) if r.get("kind") == "global"]
    rounds = [r["round"] for r in rows]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, [r["test_accuracy"] for r in rows], marker="o")
    ax1.set(xlabel="round", ylabel="held-out accuracy", title="Global adapter accuracy")
    ax1.grid(alpha=0.3)
    ax2.plot(rounds, [r["test_loss"] for r in rows], marker="o", label="held-out loss")
    train = [(r["round"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
    if train:
        ax2.plot(*zip(*train, strict=True), marker="s", label="client train loss")
    ax2.set(xlabel="round", ylabel="loss", title="Loss")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
