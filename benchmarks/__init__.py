"""fedlora's benchmark suite: ``python -m benchmarks <name> [--quick]`` or ``python -m benchmarks all``.

Each benchmark is a module of this package with ``run(quick: bool) -> (result, table)``: a JSON-able
dict and a Markdown table, written to ``benchmarks/results/<name>.json`` and ``.md`` (see
:mod:`benchmarks.harness`). ``--quick`` shrinks every size so the whole suite runs in seconds as a
smoke test (``tests/benchmarks``); its numbers mean nothing. ``docs/benchmarks.md`` collects the
full tables with the commands that produced them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name -> module (imported lazily: each benchmark pulls in different heavy dependencies)
BENCHMARKS: dict[str, str] = {
    "aggregation": "benchmarks.aggregation",
    "wire_bytes": "benchmarks.wire_bytes",
    "dp_overhead": "benchmarks.dp_overhead",
    "reproducibility": "benchmarks.reproducibility",
    "linear_probe": "benchmarks.linear_probe",
    "dp_tuning": "benchmarks.dp_tuning",
    "dp_curve": "benchmarks.dp_curve",
    "dp_claim": "benchmarks.dp_claim",
    "quality": "benchmarks.quality",
    "default_run": "benchmarks.default_run",
    "scaling": "benchmarks.scaling",
    "baseline": "benchmarks.baseline",
    "padding": "benchmarks.padding",
    "backdoor": "benchmarks.backdoor",
}

RunFn = Callable[[bool], tuple[dict[str, Any], str]]


def get(name: str) -> RunFn:
    """Return benchmark ``name``'s ``run`` function.

    Raises
    ------
    KeyError
        Naming the unknown benchmark and listing the known ones.
    """
    if name not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)} (or 'all')")
    return importlib.import_module(BENCHMARKS[name]).run
