"""Time and score the default ``fedlora simulate`` run, and record peak memory.

Runs the embedded default scenario (``simulations/default.toml``) exactly as
``fedlora simulate`` does, then writes wall-clock seconds, per-round held-out accuracy and
the peak resident memory of this process tree (driver + Ray actors, sampled every 0.5 s) to
a JSON file::

    flock /tmp/fedlora-heavy.lock python -m benchmarks default_run   # harness: JSON + Markdown
    python -m benchmarks.default_run --out FILE --set KEY=VALUE          # the same, with overrides

The run also breaks the wall clock down from the run's own metrics: clients' local training
(``train_seconds``: the optimiser steps only, summed over client rounds; one client trains at
a time with all cores), their local validation (``val_seconds``), the server's evaluation
(``eval_seconds``), the rest of the rounds (messages, per-round model set-up, aggregation,
checkpoints: the rounds' ``seconds`` minus those three) and the time outside rounds (start-up
before round 0 or 1, export, report and shutdown). ``--quick`` validates the scenario only (no Ray).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import psutil

from fedlora.config import load_toml, with_overrides
from server.outputs import read_metrics
from simulations.runner import DEFAULT_SCENARIO, simulate


def breakdown(records: list[dict], wall: float) -> dict[str, float]:
    """Split ``wall`` seconds by what the metrics rows measured (see module docstring).

    Client rows keep their metrics under ``client`` (``train_seconds``, ``val_seconds``);
    global rows carry the round's ``seconds`` and its ``eval_seconds``.
    """
    clients = [m.get("client", {}) for m in records if m["kind"] == "client"]
    rounds = [m for m in records if m["kind"] == "global"]
    train = sum(float(c.get("train_seconds", 0.0)) for c in clients)
    val = sum(float(c.get("val_seconds", 0.0)) for c in clients)
    evaluation = sum(float(m.get("eval_seconds", 0.0)) for m in rounds)
    in_rounds = sum(float(m.get("seconds", 0.0)) for m in rounds)
    return {
        "client_train_seconds": round(train, 1),
        "client_val_seconds": round(val, 1),
        "server_eval_seconds": round(evaluation, 1),
        "server_evaluations": sum(1 for m in rounds if m.get("test_accuracy") is not None),
        "round_seconds": round(in_rounds, 1),
        "rest_of_rounds_seconds": round(in_rounds - train - val - evaluation, 1),
        "outside_rounds_seconds": round(wall - in_rounds, 1),
        "train_share_of_wall": round(train / wall, 3),
    }


def measure(overrides: dict[str, str]) -> dict:
    """Run the default scenario with ``overrides``; return timings, accuracy, memory and breakdown."""
    from benchmarks.harness import PeakRss  # lazily: the file also runs as a plain script

    cfg = load_toml(DEFAULT_SCENARIO)
    run_dir = Path(tempfile.mkdtemp(prefix="fedlora-bench-"))
    cfg = with_overrides(cfg, {**overrides, "output.out_dir": str(run_dir)})
    with PeakRss(interval=0.5) as mem:
        t0 = time.perf_counter()
        simulate(cfg)
        seconds = time.perf_counter() - t0
    records = read_metrics(run_dir / "metrics.jsonl")
    return {
        "overrides": overrides,
        "wall_seconds": round(seconds, 1),
        **breakdown(records, seconds),
        "test_accuracy_per_round": {
            m["round"]: round(m["test_accuracy"], 4)
            for m in records
            if m["kind"] == "global" and m.get("test_accuracy") is not None
        },
        "final_test_accuracy": [m for m in records if m["kind"] == "global"][-1]["test_accuracy"],
        "peak_rss_mib": round(mem.peak / 2**20),
        "run_dir": str(run_dir),
    }


def run(quick: bool) -> tuple[dict, str]:
    """Harness entry: the full default run, or (``quick``) only load and validate the scenario."""
    from benchmarks.harness import machine, markdown_table

    if quick:
        cfg = load_toml(DEFAULT_SCENARIO)
        rows = [
            ["scenario loads", cfg.federation.num_clients, cfg.federation.num_rounds, "not run (--quick)"]
        ]
        return {"quick_only": True, "machine": machine()}, markdown_table(
            ["default run", "clients", "rounds", "result"], rows
        )
    r = measure({})
    rows = [
        ["wall clock (s)", r["wall_seconds"]],
        ["client local training: optimiser steps (s, summed `train_seconds`)", r["client_train_seconds"]],
        ["**training share of the wall clock**", r["train_share_of_wall"]],
        ["client local validation (s, summed `val_seconds`)", r["client_val_seconds"]],
        [
            f"server evaluation, {r['server_evaluations']} times (s, summed `eval_seconds`)",
            r["server_eval_seconds"],
        ],
        [
            "rest of the rounds: messages, model set-up, aggregation, checkpoints (s)",
            r["rest_of_rounds_seconds"],
        ],
        ["sum of round `seconds`", r["round_seconds"]],
        ["outside rounds: start-up, export, report, shutdown (s)", r["outside_rounds_seconds"]],
        [
            "held-out accuracy per evaluated round",
            ", ".join(f"{k}: {v:.3f}" for k, v in r["test_accuracy_per_round"].items()),
        ],
        ["final test accuracy", r["final_test_accuracy"]],
        ["peak RSS of driver + Ray workers (MiB)", r["peak_rss_mib"]],
    ]
    return {**r, "machine": machine()}, markdown_table(["default `fedlora simulate`", "value"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/default_run.json"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    result = {
        "scenario": str(DEFAULT_SCENARIO.name),
        **measure(overrides),
        "machine": {
            "cpus": psutil.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `benchmarks` as a package
    main()
