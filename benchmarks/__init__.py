"""fedlora's maintained benchmarks: ``python -m benchmarks <name> [--quick]`` or ``python -m benchmarks all``.

Each guards a target (``docs/benchmarks.md`` gives it, with the latest figure and its machine).
A registered benchmark is a module of this package with ``run(quick: bool) -> (result, table)``: a
JSON-able dict and a Markdown table, written to ``benchmarks/results/<name>.json`` and ``.md`` (see
:mod:`benchmarks.harness`). ``--quick`` shrinks every size so the whole suite runs in seconds as a
smoke test (``tests/benchmarks``); its numbers mean nothing. Two more start real SuperNodes or
load SmolLM2 and run standalone (``python benchmarks/deploy_overhead.py``, ``python
benchmarks/wire_objects.py``); GPU throughput is ``scripts/gpu_check.sh``. :mod:`benchmarks.quality_driver`
runs a federation in-process (fedlora's server loop and ClientApp, no Ray) for ``backdoor`` and the
studies. One-off studies (the papers' claims, DP tuning, quality grids, baselines) live in
``experiments/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name -> module (imported lazily: each benchmark pulls in different heavy dependencies)
BENCHMARKS: dict[str, str] = {
    "aggregation": "benchmarks.aggregation",
    "wire_bytes": "benchmarks.wire_bytes",
    "default_run": "benchmarks.default_run",
    "dp_overhead": "benchmarks.dp_overhead",
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
