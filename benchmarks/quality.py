"""Learning quality on the harder embedded task: strategies x split x privacy x ranks, per round.

Scenario ``simulations/quality.toml``: the embedded generator with ``roles = "agent-patient"``
(12 classes, :func:`fedlora.data.embedded.embedded_labels`), written to JSONL (seed 0) and run
with the in-process driver (:mod:`benchmarks.quality_driver`: ``fedlora simulate``'s server loop,
ClientApp, strategies and DP without Ray's start-up). Cells: every strategy x {IID, Dirichlet
0.1} x {no DP, record DP epsilon 8} x {homogeneous r = 8; ranks 4/8/16 for the rank-heterogeneous
methods}, each for ``SEEDS`` (run seed = data partition, initial adapter and batch order), plus
centralised LoRA (one client holding all data, same total steps). FedIT runs report the
cross-term error ``||sum p_k B_k A_k - B_bar A_bar|| / ||sum p_k B_k A_k||`` of every round,
measured on the updates the clients sent. ``CELLS`` restricts what runs (the full grid is
hours on two shared cores); a plot of accuracy per round is written beside the results.
``--quick``: one two-client, one-round, one-step cell (a smoke test; numbers meaningless).

    flock /tmp/fedlora-heavy.lock python -m benchmarks quality
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR, machine, markdown_table
from benchmarks.quality_driver import run_federated
from fedlora.config import RunConfig, load_toml, with_overrides
from fedlora.data.embedded import embedded_labels, embedded_splits

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "quality.toml"
ROLES = "agent-patient"
STRATEGIES = ("fedit", "ffa", "fair", "flora", "flexlora", "hetlora")
HETERO = ("flora", "flexlora", "hetlora")  # methods that accept ranks 4/8/16
HETERO_RANKS = (4, 8, 16)
SEEDS = (0,)
# (strategy, partitioner, privacy, ranks) cells that run by default: what fitted this round's budget.
CELLS: tuple[tuple[str, str, str, str], ...] = (
    ("fedit", "iid", "none", "r8"),
    ("flora", "iid", "none", "r8"),
    ("ffa", "iid", "none", "r8"),
)
QUICK = {
    "data.num_train": 40,
    "data.num_test": 12,
    "model.max_length": 16,
    "train.batch_size": 4,
    "train.local_steps": 1,
    "federation.num_clients": 2,
    "federation.num_rounds": 1,
    "data.local_val_fraction": 0.1,
}


def all_cells() -> list[tuple[str, str, str, str]]:
    """Return the full grid of issue 10 section 4 (strategy, partitioner, privacy, ranks)."""
    cells = []
    for strategy in STRATEGIES:
        for part in ("iid", "dirichlet"):
            for privacy in ("none", "record-eps8"):
                for ranks in ("r8", "r4-8-16") if strategy in HETERO else ("r8",):
                    cells.append((strategy, part, privacy, ranks))
    return cells


def write_data(cfg: RunConfig, directory: Path, seed: int) -> tuple[Path, Path]:
    """Write the harder task's train and test splits as JSONL with label names; return the paths."""
    names = embedded_labels(ROLES)
    train, test = embedded_splits(cfg.data.num_train, cfg.data.num_test, seed, roles=ROLES)
    paths = directory / f"train-{seed}.jsonl", directory / f"test-{seed}.jsonl"
    for path, records in zip(paths, (train, test), strict=True):
        lines = (json.dumps({"text": r["text"], "label": names[int(r["label"])]}) for r in records)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def cell_config(cfg: RunConfig, cell: tuple[str, str, str, str], seed: int) -> RunConfig:
    """Return the run config of one grid cell."""
    strategy, part, privacy, _ = cell
    over: dict[str, Any] = {
        "federation.strategy": strategy,
        "data.partitioner": part,
        "data.seed": seed,
        "train.seed": seed,
        "federation.seed": seed,
    }
    if privacy.startswith("record"):
        over.update({"privacy.mode": "record", "privacy.epsilon": float(privacy.removeprefix("record-eps"))})
    return with_overrides(cfg, over)


def summarise(values: list[float]) -> str:
    """Return ``mean +- std`` (std over seeds; just the value for one seed)."""
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({len(values)} seeds)"


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Plot accuracy per round per cell (seed 0) to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        if run["seed"] == SEEDS[0]:
            ax.plot(range(len(run["accuracy"])), run["accuracy"], marker="o", label=run["cell"])
    ax.set_xlabel("round")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(f"embedded task, roles = {ROLES} (12 classes)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Run the selected cells (``quick``: one tiny FedIT cell) and the centralised reference."""
    cfg = load_toml(SCENARIO)
    if quick:
        cfg = with_overrides(cfg, QUICK)
    cells = [("fedit", "iid", "none", "r8")] if quick else list(CELLS)
    seeds = SEEDS[:1] if quick else SEEDS
    data_dir = Path(tempfile.mkdtemp(prefix="fedlora-quality-data-"))
    runs: list[dict[str, Any]] = []
    for seed in seeds:
        train_path, test_path = write_data(cfg, data_dir, seed)
        base = with_overrides(cfg, {"data.source": str(train_path), "data.test_source": str(test_path)})
        for cell in cells:
            ranks = HETERO_RANKS if cell[3] == "r4-8-16" else None
            t0 = time.perf_counter()
            out = run_federated(cell_config(base, cell, seed), ranks, probe_cross_terms=cell[0] == "fedit")
            shutil.rmtree(out["run_dir"], ignore_errors=True)  # what the table needs is in ``out``
            name = "/".join(cell)
            runs.append({"cell": name, "seed": seed, **out, "seconds": time.perf_counter() - t0})
            print(f"  {name} seed {seed}: accuracy per round {out['accuracy']}", flush=True)
    shutil.rmtree(data_dir, ignore_errors=True)
    rows = []
    for name in dict.fromkeys(r["cell"] for r in runs):
        mine = [r for r in runs if r["cell"] == name]
        cross = mine[0]["cross_term"]
        rows.append(
            [
                name,
                summarise([r["accuracy"][-1] for r in mine]),
                " / ".join(f"{a:.3f}" for a in mine[0]["accuracy"]),
                "-" if not cross else " / ".join(f"{c:.3f}" for c in cross),
            ]
        )
    if not quick:
        plot(runs, RESULTS_DIR / "quality.png")  # beside the full results, whatever --out says
    result = {
        "scenario": SCENARIO.name,
        "roles": ROLES,
        "driver": "in-process (benchmarks.quality_driver)",
        "cells_run": [list(c) for c in cells],
        "cells_not_run": [list(c) for c in all_cells() if c not in cells],
        "runs": [{k: v for k, v in r.items() if k != "run_dir"} for r in runs],
        "load_average_end": os.getloadavg(),
    }
    return {**result, "machine": machine()}, markdown_table(
        [
            "cell (strategy/split/privacy/ranks)",
            "final accuracy",
            "accuracy per round (seed 0)",
            "FedIT cross-term error per round",
        ],
        rows,
    )
