"""One-off studies: the papers' claims, DP tuning, quality grids, baselines (not part of the test run).

Each study answered a question once, on the commit named beside its write-up in
``experiments/README.md``; its results stay in ``experiments/results/``. Unlike ``benchmarks/``
(the maintained measurements that guard a target), nothing here is kept current: a study runs
against the code of today, but its recorded numbers are those of its commit.

``python -m experiments <name> [--quick]`` runs one (``list`` names them); several also take
their own options, ``python -m experiments.<name> --help``. Their tests are in
``experiments/tests`` (``python -m pytest experiments/tests``, or ``nox -s experiments``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# name -> module (imported lazily: each study pulls in different heavy dependencies)
EXPERIMENTS: dict[str, str] = {
    "linear_probe": "experiments.linear_probe",
    "reproducibility": "experiments.reproducibility",
    "padding": "experiments.padding",
    "scaling": "experiments.scaling",
    "dp_tuning": "experiments.dp_tuning",
    "dp_curve": "experiments.dp_curve",
    "dp_claim": "experiments.dp_claim",
    "quality": "experiments.quality",
    "baseline": "experiments.baseline",
}

RunFn = Callable[[bool], tuple[dict[str, Any], str]]


def get(name: str) -> RunFn:
    """Return study ``name``'s ``run`` function.

    Raises
    ------
    KeyError
        Naming the unknown study and listing the known ones.
    """
    if name not in EXPERIMENTS:
        raise KeyError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)}")
    return importlib.import_module(EXPERIMENTS[name]).run
