"""Epsilon vs accuracy of ``simulations/dp.toml``: record-level DP that learns.

Runs the scenario without DP and at each target epsilon (whole run, delta 1e-5, PRV accountant;
the clients calibrate the noise once per run) with the in-process driver
(:mod:`benchmarks.quality_driver`: the server loop, ClientApp, Opacus DP-SGD and ledgers of
``fedlora simulate``, without Ray's start-up), and reports the held-out accuracy per round next
to the frozen-base linear probe (``experiments/results/linear_probe.json``). Targets (issue 10):
epsilon 8 within 15 points of the non-DP run, epsilon 3 clearly above the probe.
``--quick`` runs a two-client, one-round, one-step DP federation on 8 test examples at a given
noise multiplier (seconds): a smoke test of the path, its numbers mean nothing.

    flock /tmp/fedlora-heavy.lock python -m experiments dp_curve     # 3 federated runs
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, markdown_table
from benchmarks.quality_driver import run_federated
from experiments import RESULTS_DIR
from fedlora.config import RunConfig, load_toml, with_overrides
from fedlora.privacy.calibrate import calibrate_noise_multiplier

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "dp.toml"
EPSILONS: tuple[float | None, ...] = (None, 8.0, 3.0)  # None: the same scenario without DP
QUICK = {
    "data.num_train": 40,
    "data.num_test": 8,
    "model.max_length": 16,
    "train.batch_size": 4,
    "train.local_steps": 1,
    "federation.num_clients": 2,
    "federation.num_rounds": 1,
    "data.local_val_fraction": 0.1,  # an empty local validation set breaks the client round
    "privacy.accountant": "rdp",
    "privacy.noise_multiplier": 1.0,  # given, not calibrated: calibration alone takes ~9 s here
}


def planned_sigma(cfg: RunConfig, epsilon: float) -> float:
    """Return the noise multiplier one IID client calibrates for ``epsilon`` over the whole run."""
    per_client = cfg.data.num_train // cfg.federation.num_clients
    local = per_client - int(per_client * cfg.data.local_val_fraction)
    q = 1.0 / max(1, -(-local // cfg.train.batch_size))  # Opacus' q = 1 / batches, as clients.privacy
    steps = cfg.federation.num_rounds * cfg.train.local_steps
    return calibrate_noise_multiplier(epsilon, cfg.privacy.delta, q, steps, cfg.privacy.accountant)


def linear_probe_accuracy() -> float | None:
    """Return the frozen-base linear probe's best test accuracy (``linear_probe.json``), if measured."""
    probe_file = RESULTS_DIR / "linear_probe.json"
    if not probe_file.exists():
        return None
    return json.loads(probe_file.read_text())["linear_probe"]["best_test_accuracy"]


def run_arm(cfg: RunConfig, eps: float | None, quick: bool = False) -> dict[str, Any]:
    """Run one federated arm of ``cfg``: no DP (``eps`` None) or record DP at target ``eps``."""
    if quick:
        arm_cfg, sigma = with_overrides(cfg, {"privacy.epsilon": 0.0}), cfg.privacy.noise_multiplier
    else:
        over = {"privacy.mode": "none"} if eps is None else {"privacy.epsilon": eps}
        arm_cfg = with_overrides(cfg, over)
        sigma = None if eps is None else planned_sigma(arm_cfg, eps)
    t0 = time.perf_counter()
    out = run_federated(arm_cfg)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out["run_dir"], ignore_errors=True)  # what the table needs is in ``out``
    print(f"  epsilon {eps}: accuracy per round {out['accuracy']} ({seconds:.0f} s)", flush=True)
    return {
        "epsilon": eps,
        "noise_multiplier": sigma,
        "accuracy_per_round": out["accuracy"],
        "loss_per_round": out["loss"],
        "epsilon_spent": out["epsilon"],
        "seconds": seconds,
    }


def tabulate(arms: list[dict[str, Any]], probe: float | None) -> tuple[dict[str, Any], str]:
    """Return the benchmark's result and Markdown table for the measured ``arms``."""
    rows = []
    for arm in arms:
        eps, sigma, spent, acc = (
            arm["epsilon"],
            arm["noise_multiplier"],
            arm["epsilon_spent"],
            arm["accuracy_per_round"],
        )
        rows.append(
            [
                "no DP" if eps is None else f"{eps:g}",
                "-" if sigma is None else f"{sigma:.3f}",
                "-" if spent is None else f"{spent:.2f}",
                " / ".join(f"{a:.3f}" for a in acc),
                f"{acc[-1]:.3f}",
                f"{arm['loss_per_round'][-1]:.3f}",
                f"{arm['seconds']:.0f}",
            ]
        )
    probe_cell = "-" if probe is None else f"{probe:.3f}"
    rows.append(["frozen-base linear probe", "-", "-", "-", probe_cell, "-", "-"])
    result = {
        "scenario": SCENARIO.name,
        "driver": "in-process (benchmarks.quality_driver)",
        "arms": arms,
        "linear_probe": probe,
        "load_average_end": os.getloadavg(),
    }
    return {**result, "machine": machine()}, markdown_table(
        [
            "target epsilon",
            "noise multiplier",
            "epsilon spent (max client)",
            "accuracy per round",
            "final",
            "test loss, last round",
            "seconds",
        ],
        rows,
    )


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Run every arm (``quick``: the smoke-sized federation, DP arm only)."""
    cfg = load_toml(SCENARIO)
    if quick:
        cfg = with_overrides(cfg, QUICK)
    arms = [run_arm(cfg, eps, quick) for eps in (EPSILONS[1:2] if quick else EPSILONS)]
    return tabulate(arms, linear_probe_accuracy())
