"""Time and score the default ``fedlora simulate`` run, and record peak memory.

Runs the embedded default scenario (``simulations/default.toml``) exactly as
``fedlora simulate`` does, then writes wall-clock seconds, per-round held-out accuracy and
the peak resident memory of this process tree (driver + Ray actors, sampled every 0.5 s) to
a JSON file::

    flock /tmp/fedlora-heavy.lock python -m benchmarks default_run   # harness: JSON + Markdown
    python -m benchmarks.default_run --out FILE --set KEY=VALUE          # the same, with overrides

The harness run adds the efficiency breakdown of the wall clock: clients' local training
(``train-seconds`` summed over client rounds, one client trains at a time with all cores), the
rounds' own ``seconds``, and the rest (start-up, evaluation outside rounds, shutdown).
``--quick`` validates the scenario only (no Ray).
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
    rounds = [m for m in records if m["kind"] == "global"]
    train = sum(
        float(m.get("client", {}).get("train-seconds", 0.0)) for m in records if m["kind"] == "client"
    )
    in_rounds = sum(float(m.get("seconds", 0.0)) for m in rounds)
    return {
        "overrides": overrides,
        "wall_seconds": round(seconds, 1),
        "client_train_seconds": round(train, 1),
        "round_seconds": round(in_rounds, 1),
        "train_share_of_wall": round(train / seconds, 3),
        "outside_rounds_seconds": round(seconds - in_rounds, 1),
        "test_accuracy_per_round": [round(m["test_accuracy"], 4) for m in rounds],
        "final_test_accuracy": rounds[-1]["test_accuracy"],
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
        ["client local training (s, summed)", r["client_train_seconds"]],
        ["training share of the wall clock", r["train_share_of_wall"]],
        ["sum of round `seconds`", r["round_seconds"]],
        ["outside rounds: start-up, evaluation, shutdown (s)", r["outside_rounds_seconds"]],
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
