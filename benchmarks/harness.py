"""What every benchmark shares: timing by repetition, peak memory, result files, Markdown tables.

Machines here are shared and noisy, so speed is reported as a *ratio* to a reference measured
in the same run (each side timed as the minimum over repetitions), and absolute seconds only
next to :func:`machine` (CPU count, load average, platform) of the run that produced them.
"""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """Return what a reader needs to judge absolute numbers: CPUs, memory, load, platform."""
    import torch

    return {
        "cpus": psutil.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def tree_rss(proc: psutil.Process | None = None) -> int:
    """Return the resident memory (bytes) of ``proc`` (default: this process) and its children."""
    proc = proc or psutil.Process()
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRss:
    """Context manager sampling this process tree's RSS; ``peak`` and ``increase`` in bytes.

    ``increase`` is the peak minus the RSS on entry: the memory the measured code needed on top
    of what was already resident (allocator caches can hide reuse, so it is an upper bound of
    nothing and a lower bound of the true transient peak between samples).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakRss:
        self.start = self.peak = tree_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc: object) -> None:
        self.peak = max(self.peak, tree_rss())
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def increase(self) -> int:
        """Peak minus the RSS on entry, bytes."""
        return max(0, self.peak - self.start)


@dataclass(frozen=True)
class Timing:
    """Seconds of each repetition; ``best`` (min) is what ratios use."""

    seconds: tuple[float, ...]

    @property
    def best(self) -> float:
        """The minimum over repetitions (the least disturbed by other load)."""
        return min(self.seconds)

    @property
    def median(self) -> float:
        """The median over repetitions."""
        s = sorted(self.seconds)
        return s[len(s) // 2]

    def as_dict(self) -> dict[str, Any]:
        """JSON form: every repetition plus min and median."""
        return {"min_s": self.best, "median_s": self.median, "runs_s": list(self.seconds)}


def time_reps(fn: Callable[[], object], reps: int) -> tuple[Timing, object]:
    """Call ``fn`` ``reps`` times; return the timings and the last result."""
    seconds, out = [], None
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        out = fn()
        seconds.append(time.perf_counter() - t0)
    return Timing(tuple(seconds)), out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a GitHub Markdown table (floats printed with 3 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_result(name: str, result: dict[str, Any], table: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` (``result`` + machine) and ``<name>.md`` (``table``); return the JSON path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, **result, "machine": result.get("machine", machine())}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    m = payload["machine"]
    footer = (
        f"\n\nMachine: {m['cpus']} CPUs, {m['memory_gib']} GiB, load average {m['load_average_1min']} "
        f"at the end, torch {m['torch']} ({m['torch_threads']} threads), {m['platform']}."
    )
    (out_dir / f"{name}.md").write_text(table + footer + "\n", encoding="utf-8")
    return path


_BASE_CACHE: dict[tuple[str, int], Any] = {}


def fresh_classifier(model_path: str, num_labels: int) -> Any:
    """Return a fresh copy of a sequence-classification base (loaded once per process, then copied).

    The head is initialised from torch's global generator at load time; copies share that
    initialisation, so arms compared against each other start from identical weights.
    """
    import copy

    from transformers import AutoModelForSequenceClassification

    key = (model_path, num_labels)
    if key not in _BASE_CACHE:
        import torch

        torch.manual_seed(0)
        _BASE_CACHE[key] = AutoModelForSequenceClassification.from_pretrained(
            model_path, num_labels=num_labels
        )
    return copy.deepcopy(_BASE_CACHE[key])
