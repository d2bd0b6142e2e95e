"""Epsilon vs accuracy of ``simulations/dp.toml``: record-level DP that learns.

Runs ``fedlora simulate --config simulations/dp.toml`` without DP and at each target epsilon
(whole run, delta 1e-5, PRV accountant; the clients calibrate the noise once per run) and reports
the final held-out accuracy next to the frozen-base linear probe (``benchmarks/results/
linear_probe.json``). Targets (issue 10): epsilon 8 within 15 points of the non-DP run, epsilon 3
clearly above the probe. ``--quick`` only loads the scenario and prints the calibrated noise
multipliers (no simulation).

    flock /tmp/fedlora-heavy.lock python -m benchmarks dp_curve     # 4 simulations
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.harness import RESULTS_DIR, machine, markdown_table
from fedlora.config import RunConfig, load_toml, with_overrides
from fedlora.privacy.calibrate import calibrate_noise_multiplier

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "dp.toml"
EPSILONS = (None, 8.0, 3.0, 1.0)  # None: the same scenario without DP


def planned_sigma(cfg: RunConfig, epsilon: float) -> float:
    """Return the noise multiplier one client calibrates for ``epsilon`` (IID equal shares)."""
    per_client = cfg.data.num_train // cfg.federation.num_clients
    q = min(1.0, cfg.train.batch_size / per_client)
    steps = cfg.federation.num_rounds * cfg.train.local_steps
    return calibrate_noise_multiplier(epsilon, cfg.privacy.delta, q, steps, cfg.privacy.accountant)


def final_accuracy(cfg: RunConfig) -> float:
    """Run one simulation and return its last round's held-out accuracy."""
    from server.outputs import read_metrics
    from simulations.runner import simulate

    out = Path(tempfile.mkdtemp(prefix="fedlora-dpcurve-"))
    simulate(with_overrides(cfg, {"output.out_dir": str(out)}))
    rows = [m for m in read_metrics(out / "metrics.jsonl") if m.get("kind") == "global"]
    return float(rows[-1]["test_accuracy"])


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Simulate every arm (``quick``: calibrate only)."""
    cfg = load_toml(SCENARIO)
    probe_file = RESULTS_DIR / "linear_probe.json"
    probe = (
        json.loads(probe_file.read_text())["linear_probe"]["best_test_accuracy"]
        if probe_file.exists()
        else None
    )
    arms, rows = [], []
    for eps in EPSILONS:
        arm_cfg = with_overrides(cfg, {"privacy.mode": "none"} if eps is None else {"privacy.epsilon": eps})
        sigma = None if eps is None else planned_sigma(arm_cfg, eps)
        acc = None if quick else final_accuracy(arm_cfg)
        arms.append({"epsilon": eps, "noise_multiplier": sigma, "final_accuracy": acc})
        rows.append(
            [
                "no DP" if eps is None else f"{eps:g}",
                "-" if sigma is None else f"{sigma:.3f}",
                "not run (--quick)" if acc is None else f"{acc:.3f}",
            ]
        )
    rows.append(["frozen-base linear probe", "-", "-" if probe is None else f"{probe:.3f}"])
    result = {"scenario": str(SCENARIO.name), "arms": arms, "linear_probe": probe}
    return {**result, "machine": machine()}, markdown_table(
        ["epsilon", "noise multiplier", "final accuracy"], rows
    )
