"""What ``fedlora simulate`` shows: a live progress line per round, quiet logs, a final summary.

The server's round loop prints one result line per round and knows nothing about the
console. Progress is observed from outside: :class:`ProgressGrid` wraps Flower's ``Grid``
(a :class:`server.grid.PollingGrid`: Flower's push-then-poll semantics at 0.1 s)
and reports every reply as it arrives, and :class:`LiveProgress` draws it with rich.
On a terminal the progress line is redrawn in place and removed when the run ends; in a
log file (no terminal) nothing but the result lines is written.

Verbosity: 0 shows fedlora's warnings only and hides Flower's DEBUG/deprecation output,
Ray's actor output and library warnings; 1 adds fedlora's debug log (driver and clients);
2 adds Flower's and Ray's logs.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from fedlora.logs import LOG_LEVEL_ENV, configure
from server.grid import PollingGrid

# Loggers of this project (module ``__name__`` prefixes).
PROJECT_LOGGERS = ("fedlora", "clients", "server", "strategies", "simulations")


def quiet_environment(verbosity: int | None) -> dict[str, Any]:
    """Set log levels and environment for ``verbosity``; return Ray/Flower logging arguments.

    The environment is inherited by the Ray actors that run the ClientApps, so the same
    levels hold there. ``None`` (a library call, e.g. from tests) leaves this project's
    loggers as the caller configured them and otherwise behaves like 0. Returns
    ``init_args`` entries for Ray and ``verbose_logging`` for Flower's ``run_simulation``.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if verbosity is not None:
        level = logging.DEBUG if verbosity >= 1 else logging.WARNING
        os.environ[LOG_LEVEL_ENV] = logging.getLevelName(level)
        configure(level)
    verbosity = verbosity or 0
    if verbosity < 2:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        warnings.filterwarnings("ignore")
        for name in ("transformers", "peft", "ray", "filelock", "datasets", "opacus", "bitsandbytes"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    flwr_logger = logging.getLogger("flwr")
    # Flower logs through its own console handler; propagating to the root logger (which
    # Ray configures) printed every line twice, once with a timestamp.
    flwr_logger.propagate = False
    if verbosity < 2:
        flwr_logger.setLevel(logging.WARNING)
        flwr_logger.addFilter(_drop_deprecation)
    return {
        "init_args": {
            "logging_level": "INFO" if verbosity >= 2 else "ERROR",
            # Actor stdout/stderr: the clients' debug log at -v; at 0 a client's failure still
            # reaches the console as the server's "update excluded: client error" warning.
            "log_to_driver": verbosity >= 1,
        },
        "verbose_logging": verbosity >= 2,
    }


def _drop_deprecation(record: logging.LogRecord) -> bool:
    """Drop Flower's ``run_simulation`` deprecation notice (nothing a fedlora user can act on)."""
    return "DEPRECATED FEATURE" not in record.getMessage()


class LiveProgress:
    """One live progress line (rich) for the phase the run is in; a no-op without a terminal."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=False)
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(bar_width=24),
            TextColumn("{task.fields[count]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            redirect_stdout=True,
            redirect_stderr=True,
            disable=not self.console.is_terminal,
        )
        self._task: Any = None
        self._started = False
        self._total: int | None = None
        self._unit = ""

    def phase(self, description: str, total: int | None, unit: str = "") -> None:
        """Start showing ``description`` with ``total`` steps (``None``: a spinner only)."""
        if not self._started:
            self._progress.start()
            self._started = True
        if self._task is not None:
            self._progress.remove_task(self._task)
        self._total, self._unit = total, unit
        self._task = self._progress.add_task(description, total=total, count=self._count(0))

    def _count(self, completed: int) -> str:
        return "" if self._total is None else f"{completed}/{self._total} {self._unit}".rstrip()

    def advance(self, completed: int, description: str | None = None) -> None:
        """Set the current phase's completed count (and optionally its description)."""
        if self._task is None:
            return
        fields: dict[str, Any] = {"completed": completed, "count": self._count(completed)}
        if description is not None:
            fields["description"] = description
        self._progress.update(self._task, **fields)

    def stop(self) -> None:
        """Remove the progress line (the result lines above it stay)."""
        if self._started:
            self._progress.stop()
            self._started = False
            self._task = None


class StopGrid(PollingGrid):
    """A grid whose every call raises :class:`simulations.interrupt.RunStopped` once ``stop`` is set.

    After Ctrl-C this ends the ServerApp's thread at its next poll instead of leaving it
    waiting for replies (or nodes) that will never come.
    """

    def __init__(self, inner: Grid, stop: threading.Event) -> None:
        super().__init__(inner)
        self.stop = stop

    def _check_stop(self) -> None:
        if self.stop.is_set():
            from simulations.interrupt import RunStopped

            raise RunStopped("the run was interrupted (Ctrl-C)")

    def get_node_ids(self) -> Iterable[int]:  # noqa: D102 - Grid API
        self._check_stop()
        return super().get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:  # noqa: D102 - Grid API
        self._check_stop()
        return super().push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:  # noqa: D102 - Grid API
        self._check_stop()
        return super().pull_messages(message_ids)


class ProgressGrid(PollingGrid):
    """A :class:`~server.grid.PollingGrid` that reports each reply to a :class:`LiveProgress`.

    With ``stop``, the grid it polls is a :class:`StopGrid` (Ctrl-C ends the ServerApp).
    """

    def __init__(
        self,
        inner: Grid,
        progress: LiveProgress,
        num_rounds: int,
        poll: float = 0.1,
        *,
        stop: threading.Event | None = None,
    ) -> None:
        super().__init__(inner if stop is None else StopGrid(inner, stop), poll)
        self.progress, self.num_rounds, self._label = progress, num_rounds, ""

    def _describe(self, messages: list[Message]) -> str:
        first = messages[0]
        if first.metadata.message_type.startswith("train"):
            try:
                rnd = int(first.content["config"]["round"])
            except (KeyError, TypeError, ValueError):
                return "training"
            return f"round {rnd}/{self.num_rounds}"
        return "clients loading the model and their data"

    def on_push(self, messages: list[Message]) -> None:  # noqa: D102 - PollingGrid hook
        self._label = self._describe(messages)
        self.progress.phase(self._label, total=len(messages), unit="clients")

    def on_reply(self, received: int) -> None:  # noqa: D102 - PollingGrid hook
        self.progress.advance(received)

    def on_done(self, received: int) -> None:  # noqa: D102 - PollingGrid hook
        after = (
            f"{self._label}: aggregating, evaluating"
            if self._label.startswith("round")
            else "evaluating the initial adapter"
        )
        self.progress.advance(received, after)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _bytes(row: Mapping[str, Any], key: str) -> int:
    """Read ``bytes_up``/``bytes-up`` (either spelling) from a metrics row."""
    value = row.get(key, row.get(key.replace("_", "-"), 0))
    return int(value or 0)


def _privacy_line(run_dir: Path) -> str:
    path = run_dir / "privacy_report.json"
    if not path.is_file():
        return "no report written"
    report = json.loads(path.read_text(encoding="utf-8"))
    if not report.get("formal_guarantee"):
        mode = report.get("facts", {}).get("mode", "none")
        return "no DP (no formal guarantee)" if mode == "none" else "DP configured, nothing released under DP"
    acc = report["facts"].get("accountant", "prv")
    clients = report["clients"]
    eps = [c.get("epsilon", c.get(f"epsilon_{acc}")) or c.get("epsilon_rdp") for c in clients]
    worst = max(float(e) for e in eps if e is not None)
    return f"ε ≤ {worst:.2f} at δ = {clients[0]['delta']:g} (largest of {len(clients)}, {acc.upper()})"


def _score_rows(scored: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Return the summary's score rows for the evaluated rounds ``scored`` (may be empty).

    Classification runs report label accuracy. Causal-LM runs (rows with ``test_exact_match``)
    report exact match of the greedy answers, and next-token accuracy and perplexity of the
    reference responses, each named so: their ``test_accuracy`` is token accuracy, not a task score.
    """
    if not scored:
        return []
    final, first = scored[-1], scored[0]
    if "test_exact_match" not in final:
        best = max(scored, key=lambda r: r["test_accuracy"])
        out = [
            ("final test accuracy", f"{final['test_accuracy']:.3f}  (loss {final['test_loss']:.3f})"),
            ("best test accuracy", f"{best['test_accuracy']:.3f}  (round {best['round']})"),
        ]
        if first["round"] == 0:
            out.append(("round 0 (initial adapter)", f"{first['test_accuracy']:.3f}"))
        return out

    def causal(row: dict[str, Any]) -> str:
        return (
            f"exact match {row['test_exact_match']:.3f}, token accuracy {row['test_accuracy']:.3f}, "
            f"perplexity {row['test_perplexity']:.2f}"
        )

    best = max(scored, key=lambda r: r["test_exact_match"])
    out = [
        ("final (held-out)", causal(final)),
        ("best exact match", f"{best['test_exact_match']:.3f}  (round {best['round']})"),
    ]
    if first["round"] == 0:
        out.append(("round 0 (base model)", causal(first)))
    return out


def summary_table(run_dir: Path, seconds: float) -> Table:
    """Return the end-of-run table: held-out scores, bytes, ε and where the results are."""
    rows = [r for r in _read_jsonl(run_dir / "metrics.jsonl") if r.get("kind") == "global"]
    table = Table(title="fedlora simulate: summary", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    scored = [r for r in rows if r.get("test_accuracy") is not None]  # output.eval_every / eval_initial
    if rows:
        table.add_row("rounds", f"{rows[-1]['round']} in {seconds:.0f} s")
    for name, row in _score_rows(scored):
        table.add_row(name, row)
    if rows:
        up = sum(_bytes(r, "bytes_up") for r in rows)
        down = sum(_bytes(r, "bytes_down") for r in rows)
        table.add_row("bytes, all rounds", f"{up / 1e6:.2f} MB up, {down / 1e6:.2f} MB down")
        rejected = sum(len(r.get("rejected") or []) for r in rows)
        if rejected:
            table.add_row("rejected updates", f"{rejected} (reasons in metrics.jsonl)")
    table.add_row("privacy", _privacy_line(run_dir))
    table.add_row("results", str(run_dir))
    table.add_row("  adapter (PEFT)", str(run_dir / "adapter"))
    table.add_row("  metrics", "metrics.jsonl, metrics.png")
    table.add_row("  privacy report", "privacy_report.md / .html / .json")
    return table


def print_summary(console: Console, run_dir: Path, seconds: float) -> None:
    """Print :func:`summary_table` (also without a terminal: it is the run's last word)."""
    console.print(summary_table(run_dir, seconds))
    sys.stdout.flush()
