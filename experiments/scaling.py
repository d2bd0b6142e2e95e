"""``fedlora simulate`` with 10, 50, 100 and 500 virtual clients: seconds per round and peak memory.

The per-round work is held constant: a fixed number of clients is sampled each round
(``federation.clients_per_round``) and each trains a few local steps, on a fixed total data set
cut into ever more partitions. What may grow with the number of clients is the federation's
bookkeeping: Flower's node state, the server's per-node information, the data partition, the
clients' cached local splits. Memory must stay flat (one shared base model per worker process).

Each client count runs the same runner as ``fedlora simulate`` in a fresh process, measured from
its messages (:mod:`experiments.baselines.metering`): seconds per round (between the starts of
consecutive rounds), start-up (Ray, querying every node, the initial evaluation) and the peak
resident memory of the whole process tree (driver + Ray workers, sampled every 0.25 s).

``--quick`` runs no simulation: it checks that the scenarios build and partition for every client
count (seconds).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, load_toml, with_overrides
from simulations.runner import DEFAULT_SCENARIO

CLIENT_COUNTS = (10, 50, 100, 500)
#: Fixed per-round work: 4 sampled clients x 2 local steps of batch 8; 5000 examples in all.
SCENARIO: dict[str, str] = {
    "federation.clients_per_round": "4",
    "federation.num_rounds": "3",
    "federation.strategy": "fedit",
    "train.local_steps": "2",
    "train.batch_size": "8",
    "data.num_train": "5000",
    "data.num_test": "100",
    "model.max_length": "32",
}


def scenario(num_clients: int, out_dir: Path) -> RunConfig:
    """Return the scaling scenario for ``num_clients`` virtual clients, writing under ``out_dir``."""
    overrides = {**SCENARIO, "federation.num_clients": str(num_clients), "output.out_dir": str(out_dir)}
    return with_overrides(load_toml(DEFAULT_SCENARIO), overrides)


def table(runs: dict[str, dict[str, Any]]) -> str:
    """Return the Markdown table of measured runs (client count -> ``metering.summarize`` result)."""
    from benchmarks.harness import markdown_table

    rows = []
    for n, r in runs.items():
        gaps = r["round_seconds"]
        rows.append(
            [
                int(n),
                r["clients_per_round"][-1],
                r["examples_per_client"],
                gaps[0],
                min(gaps[1:]) if len(gaps) > 1 else "-",
                r["startup_seconds"],
                round(sum(q["seconds"] for q in r["query_calls"]), 1),
                r["peak_rss_mib"],
                " / ".join(str(m) for m in r["rss_after_round_mib"]),
                " / ".join(str(m) for m in r["driver_rss_after_round_mib"]),
            ]
        )
    header = [
        "virtual clients",
        "sampled per round",
        "examples per client",
        "round 1 s (loads the base into the worker)",
        "later rounds s (min)",
        "start-up s",
        "of which querying every node s",
        "peak RSS MiB (driver + Ray)",
        "RSS after each round MiB",
        "of which driver MiB",
    ]
    return markdown_table(header, rows)


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Harness entry (see the module docstring)."""
    from benchmarks.harness import machine, markdown_table
    from experiments.baselines.metering import run_isolated
    from fedlora.data.cached import partitions

    work = Path(tempfile.mkdtemp(prefix="fedlora-scaling-"))
    rows, runs = [], {}
    for n in CLIENT_COUNTS:
        cfg = scenario(n, work / f"n{n}" / "run")
        sizes = [len(p) for p in partitions(cfg.data, cfg.model.task, n)]
        if quick:
            rows.append(
                [n, cfg.federation.clients_per_round, f"{min(sizes)}-{max(sizes)}", "not run (--quick)"]
            )
            continue
        r = run_isolated("fedlora", cfg, work / f"n{n}", timeout=900)
        runs[str(n)] = {**r, "examples_per_client": f"{min(sizes)}-{max(sizes)}"}
    if quick:
        header = ["virtual clients", "sampled per round", "examples per client", "result"]
        return {"quick_only": True, "scenario": SCENARIO, "machine": machine()}, markdown_table(header, rows)
    peaks = [runs[str(n)]["peak_rss_mib"] for n in CLIENT_COUNTS]
    result = {
        "scenario": SCENARIO,
        "runs": runs,
        "peak_rss_ratio_largest_to_smallest": round(peaks[-1] / peaks[0], 3),
        "machine": machine(),
    }
    return result, table(runs)
