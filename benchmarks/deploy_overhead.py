"""Per-round overhead of a real SuperNode beyond training, with and without the warm worker.

Usage::

    python benchmarks/deploy_overhead.py [--rounds 4] [--overrides "model.name=..."] [--json out.json]

For each mode it starts a local TLS + node-auth deployment (:class:`fedlora.deploy.fleet.Fleet`)
with one SuperNode — plain ``flower-supernode`` ("in-process": Flower starts a fresh
ClientApp process per message, which imports torch and loads the model every round) or
``fedlora node`` ("worker": the round runs in the node's long-lived worker) — and runs the
fedlora app for ``--rounds`` rounds with DP off and a tiny configuration.

Two overheads per round, both beyond the client's own work (``train-seconds``, the optimiser
steps, plus ``val-seconds``, its local validation):

* node overhead = ``clientapp-seconds`` (from the start of the round's ClientApp task to its
  reply) minus that work: process start, imports, model load, data, message transfer —
  what the worker removes;
* round overhead = the server's round time (``seconds`` of the global metrics row: from
  sending the messages to the end of the server's evaluation) minus the server evaluation
  (``eval_seconds``) and the client's work: the node overhead plus Flower's polling (the
  SuperNode polls the SuperLink every 3 s when idle; the ServerApp pulls replies every 0.1 s,
  ``server/grid.py``) and transfer, the same in both modes.

Round 1 of the worker includes its one-time model load; the steady state is the median of
rounds 2..R. In worker mode the worker's own per-task log (``task phases (s): pull ... load ...
run ... push ...``, :mod:`clients.worker`) is collected too: ``pull`` is the wait for the
round's message to reach the node, ``push`` the reply's way back to the SuperNode.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedlora.deploy.fleet import Fleet  # noqa: E402

ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
}
SMALL = (
    "data.num_train=32 data.num_test=16 model.max_length=16 train.local_steps=2 train.batch_size=8 "
    "train.device=cpu lora.rank=4 federation.num_clients=1 federation.node_wait_timeout=300"
)


def overheads(metrics_path: Path) -> list[dict[str, float]]:
    """Return per round: round seconds, client work (train + validation) seconds, overheads, worker flag."""
    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [{**row.pop("client", {}), **row} for row in rows]  # a client's metrics may be nested
    rows = [{k.replace("-", "_"): v for k, v in row.items()} for row in rows]
    clients = {r["round"]: r for r in rows if r["kind"] == "client"}
    out = []
    for row in rows:
        if row["kind"] != "global" or row["round"] < 1 or row["round"] not in clients:
            continue
        client = clients[row["round"]]
        work = client["train_seconds"] + client.get("val_seconds", 0.0)  # the client's own work
        out.append(
            {
                "round": row["round"],
                "round_s": row["seconds"],
                "train_s": work,
                "overhead_s": row["seconds"] - (row.get("eval_seconds") or 0.0) - work,
                "clientapp_s": client.get("clientapp_seconds", float("nan")),
                "node_overhead_s": client.get("clientapp_seconds", float("nan")) - work,
                "worker": int(client.get("worker", 0)),
            }
        )
    return out


PHASES = re.compile(r"task phases \(s\): (.*)")


def task_phases(log: str) -> list[dict[str, float]]:
    """Return the worker's per-task phase seconds from its log, in task order.

    ``task_phases("... task phases (s): pull 0.250 run 1.000")`` is ``[{"pull": 0.25, "run": 1.0}]``.
    """
    out = []
    for match in PHASES.finditer(log):
        words = match.group(1).split()
        out.append({name: float(sec) for name, sec in zip(words[::2], words[1::2], strict=True)})
    return out


def measure(
    worker: bool, rounds: int, overrides: str, workdir: Path, scenario: str = "simulations/default.toml"
) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Run one deployment in ``workdir``; return its per-round overheads and the worker's task phases."""
    out = workdir / "run"
    with Fleet(workdir / "fleet", extra_env=ENV) as fleet:
        fleet.start_superlink()
        node_config = {"partition-id": 0, "num-partitions": 1, "state-dir": str(workdir / "state")}
        fleet.add_nodes({"edge": node_config}, worker=worker)
        fleet.wait_for_nodes(timeout=600)
        config = {
            "num-server-rounds": rounds,
            "out-dir": str(out),
            "scenario": scenario,
            "overrides": f"{SMALL} {overrides}",
        }
        result = fleet.run_app(ROOT, config, timeout=1800)
        if not result.ok:
            raise SystemExit(f"run failed: {result.status}\n{result.logs[-3000:]}\n{fleet.log_tails()}")
        phases = task_phases("\n".join(fleet.collect_logs().values()))
    return overheads(out / "metrics.jsonl"), phases


def main(argv: list[str] | None = None) -> int:
    """Measure both modes and print a table (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per mode (>= 2)")
    parser.add_argument("--overrides", default="", help="extra section.key=value overrides (e.g. the model)")
    parser.add_argument(
        "--scenario",
        default="simulations/default.toml",
        help="scenario TOML inside the app (e.g. instruct.toml)",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the fleets' logs here (default: a temp dir)"
    )
    parser.add_argument(
        "--modes", default="in-process,worker", help="comma-separated subset of: in-process, worker"
    )
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2 (round 1 of the worker includes its model load)")
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedlora-overhead-") as tmp:
        if args.workdir is not None:
            tmp = str(args.workdir)
        modes = [m.strip() for m in args.modes.split(",")]
        unknown = set(modes) - {"in-process", "worker"}
        if unknown:
            parser.error(f"unknown --modes {sorted(unknown)}; choose from in-process, worker")
        for mode in modes:
            worker = mode == "worker"
            per_round, phases = measure(worker, args.rounds, args.overrides, Path(tmp) / mode, args.scenario)
            steady = [r for r in per_round if r["round"] >= 2]
            results[mode] = {
                "rounds": per_round,
                "worker_task_phases": phases,
                "median_node_overhead_s": statistics.median(r["node_overhead_s"] for r in steady),
                "median_round_overhead_s": statistics.median(r["overhead_s"] for r in steady),
            }
    print(
        f"{'mode':<11} {'round':>5} {'round s':>8} {'work s':>8} {'clientapp s':>11} "
        f"{'node ovh s':>10} {'round ovh s':>11} {'worker':>6}"
    )
    for mode, res in results.items():
        for r in res["rounds"]:
            print(
                f"{mode:<11} {r['round']:>5} {r['round_s']:>8.2f} {r['train_s']:>8.2f} "
                f"{r['clientapp_s']:>11.2f} {r['node_overhead_s']:>10.2f} {r['overhead_s']:>11.2f} "
                f"{r['worker']:>6}"
            )
    for mode, res in results.items():
        for i, phases in enumerate(res["worker_task_phases"]):
            print(
                f"{mode} worker task {i + 1} phases (s): "
                + " ".join(f"{k} {v:.3f}" for k, v in phases.items())
            )
    for mode, res in results.items():
        print(
            f"{mode}: median per round (rounds 2..{args.rounds}): node overhead "
            f"{res['median_node_overhead_s']:.2f} s, round overhead {res['median_round_overhead_s']:.2f} s"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
