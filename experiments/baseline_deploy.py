"""fedlora against the plain Flower app on real SuperNodes (issue 10, section 3: the ">= 2x" target).

A standalone command, not part of ``python -m benchmarks all`` (a deployment cannot run in
seconds, and every registered benchmark runs its ``--quick`` mode in the test suite)::

    python -m experiments.baseline_deploy [--rounds 4] [--nodes 2] [--privacy none,record]
        [--arms plain,plain-poll,fedlora] [--out experiments/results]

Each arm is a fresh local deployment made of real processes (:class:`fedlora.deploy.fleet.Fleet`:
a SuperLink with TLS and SuperNode authentication, ``--nodes`` SuperNodes on this machine), the
same task and sizes (:data:`SIZES`), DP off or record-level DP (σ = 1, C = 1):

* ``plain``: the plain Flower app (:mod:`experiments.baselines.plain_flower`, the pattern of
  Flower's Opacus/PEFT examples: model rebuilt every message, a fresh ``PrivacyEngine`` per round
  under DP, FedAvg of the whole adapter state), bundled at run time into a temporary app
  directory (:func:`build_plain_app`) and run by plain ``flower-supernode`` (a ``flwr-clientapp``
  process per message), its ServerApp on Flower's own grid (replies pulled every 3 s);
* ``plain-poll``: the same, but its ServerApp pulls replies every 0.1 s as fedlora's does
  (:class:`server.grid.PollingGrid`), to tell the polling apart from the rest;
* ``fedlora``: fedlora's app (this repository, FedIT = FedAvg of A and B) on ``fedlora node``
  (SuperNode + warm worker that keeps the base model loaded across rounds).

Both apps read the same :class:`fedlora.config.RunConfig` (built once from the run config given
to fedlora). Seconds per round, measured the same way on both: from the server sending the
round's train messages to the end of its central evaluation of the new global adapter (fedlora's
``seconds`` in ``metrics.jsonl``; for the plain app the ServerApp's
:class:`~experiments.baselines.plain_deploy_app.TimedGrid` and its timed evaluation). Round 1
includes one-time work (fedlora's worker loads the model), so the steady state is rounds
2..R: their median (the table's speed-up) and minimum. Also: the whole run's wall time
(``flwr run`` submit to end: start-up, round 0's evaluation and every round), bytes per round
(the array records of the round's train messages, down + up), peak RSS of each SuperNode's
process tree (SuperNode + ``flwr-clientapp`` or worker, sampled every 0.25 s; the maximum over
nodes) and the final held-out accuracy.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python experiments/baseline_deploy.py` as well as `-m`
    sys.path.insert(0, str(ROOT))

NAME = "baseline_deploy"
#: The task and sizes of both apps (section.key=value overrides of simulations/default.toml).
SIZES: dict[str, str] = {
    "federation.strategy": "fedit",
    "train.local_steps": "10",
    "train.batch_size": "16",
    "train.device": "cpu",
    "data.num_train": "2000",
    "data.num_test": "200",
    "model.max_length": "32",
}
DP: dict[str, str] = {
    "privacy.mode": "record",
    "privacy.noise_multiplier": "1.0",
    "privacy.max_grad_norm": "1.0",
}
ARMS: dict[str, str] = {
    "plain": "plain Flower app, `flower-supernode`, Flower's grid (3 s reply poll)",
    "plain-poll": "plain Flower app, `flower-supernode`, 0.1 s reply poll",
    "fedlora": "fedlora, `fedlora node` (warm worker)",
}
PRIVACY = ("none", "record")
TARGET_SPEEDUP = 2.0
FIRST_STEADY_ROUND = 2
PLAIN_PACKAGE = "plain_baseline"
PLAIN_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "plainflowerlora"
version = "1.0.0"
description = "The plain Flower federated LoRA baseline of fedlora's benchmarks, deployable"
license = "Apache-2.0"
dependencies = ["flwr==1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "{PLAIN_PACKAGE}.plain_deploy_app:server_app"
clientapp = "{PLAIN_PACKAGE}.plain_deploy_app:client_app"

[tool.flwr.app.config]
meter-file = ""
reply-poll = 0.0
"""


# ---------------------------------------------------------------------- pure functions


def overrides_string(overrides: Mapping[str, str]) -> str:
    """Return fedlora's run-config ``overrides`` value: space-separated ``section.key=value``.

    ``overrides_string({"a.b": "1", "c.d": "x"})`` is ``"a.b=1 c.d=x"``.

    Raises
    ------
    ValueError
        If a key or value is empty or holds whitespace (the string could not be split back).
    """
    items = []
    for key, value in overrides.items():
        if not key or not value or any(c.isspace() for c in key + value):
            raise ValueError(f"override {key!r}={value!r}: key and value must be non-empty, without spaces")
        items.append(f"{key}={value}")
    return " ".join(items)


def parse_overrides(text: str) -> dict[str, str]:
    """Return ``{"section.key": "value"}`` of space-separated ``section.key=value`` pairs.

    ``parse_overrides("a.b=1 c.d=x")`` is ``{"a.b": "1", "c.d": "x"}``.

    Raises
    ------
    ValueError
        Naming an item without ``=``.
    """
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise ValueError(f"override {item!r}: expected section.key=value")
        out[key] = value
    return out


def fedlora_rounds(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Return per round (>= 1) seconds, bytes and accuracy from fedlora's metrics.jsonl rows.

    ``seconds`` is the global row's ``seconds`` (sending the round's messages to the end of the
    server's evaluation); ``bytes`` is ``bytes_down + bytes_up``; client rows are skipped.
    """
    out = []
    for row in rows:
        if row.get("kind") != "global" or int(row["round"]) < 1:
            continue
        out.append(
            {
                "round": int(row["round"]),
                "seconds": float(row["seconds"]),
                "bytes": int(row.get("bytes_down", 0)) + int(row.get("bytes_up", 0)),
                "accuracy": row.get("test_accuracy"),
            }
        )
    return out


def plain_rounds(meter: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Return per round seconds, bytes and accuracy from the plain app's meter record.

    The k-th train call (``type`` starting with ``train``) is round k; its ``seconds`` run from the
    call's ``start`` to the ``end`` of round k's central evaluation (the same span as fedlora's).

    Raises
    ------
    ValueError
        If a train round has no evaluation (the run did not finish: see its logs).
    """
    evals = {int(e["round"]): e for e in meter["evaluations"]}
    trains = [c for c in meter["calls"] if str(c["type"]).startswith("train")]
    out = []
    for k, call in enumerate(trains, start=1):
        if k not in evals:
            raise ValueError(f"plain app: round {k} was sent but never evaluated; the run did not finish")
        out.append(
            {
                "round": k,
                "seconds": float(evals[k]["end"]) - float(call["start"]),
                "bytes": int(call["bytes_down"]) + int(call["bytes_up"]),
                "accuracy": evals[k]["accuracy"],
                "errors": int(call["errors"]),
            }
        )
    return out


def steady_state(rounds: Sequence[Mapping[str, Any]], first: int = FIRST_STEADY_ROUND) -> dict[str, Any]:
    """Return the median and minimum ``seconds`` of rounds ``first``.. (round 1 holds one-time work).

    ``steady_state([{"round": 1, "seconds": 9.0}, {"round": 2, "seconds": 3.0},
    {"round": 3, "seconds": 5.0}])`` is ``{"rounds": [2, 3], "median_s": 4.0, "min_s": 3.0}``.

    Raises
    ------
    ValueError
        If no round numbered ``first`` or later exists (run at least ``first`` rounds).
    """
    kept = [r for r in rounds if int(r["round"]) >= first]
    if not kept:
        raise ValueError(f"no round >= {first} to measure the steady state; run at least {first} rounds")
    secs = [float(r["seconds"]) for r in kept]
    return {
        "rounds": [int(r["round"]) for r in kept],
        "median_s": statistics.median(secs),
        "min_s": min(secs),
    }


def speedups(arms: Mapping[str, Mapping[str, Any]], reference: str = "plain") -> dict[str, float]:
    """Return, per arm key ``<arm>/<privacy>``, the reference's median s/round over the arm's.

    A value of 2.0 means the arm's steady-state round takes half the reference's (same privacy).
    Arms whose privacy has no reference arm are left out.
    """
    out = {}
    for key, arm in arms.items():
        privacy = key.split("/", 1)[1]
        ref = arms.get(f"{reference}/{privacy}")
        if ref is not None:
            out[key] = ref["steady"]["median_s"] / arm["steady"]["median_s"]
    return out


# ---------------------------------------------------------------------- deployment


class NodeRss:
    """Sample the RSS of each given process tree every ``interval`` s; ``peak`` per pid (bytes)."""

    def __init__(self, pids: Sequence[int], interval: float = 0.25) -> None:
        self.pids, self.interval = list(pids), interval
        self.peak = dict.fromkeys(self.pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> NodeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        from benchmarks.harness import tree_rss

        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], tree_rss(psutil.Process(pid)))
                except psutil.Error:
                    pass
            time.sleep(self.interval)


def build_plain_app(app_dir: Path) -> Path:
    """Write the plain app's Flower App directory (pyproject + a package of the two modules)."""
    from experiments.baselines import plain_deploy_app, plain_flower

    pkg = app_dir / PLAIN_PACKAGE
    pkg.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(PLAIN_PYPROJECT, encoding="utf-8")
    (pkg / "__init__.py").write_text('"""The plain Flower baseline, bundled by fedlora\'s benchmark."""\n')
    for module in (plain_flower, plain_deploy_app):
        shutil.copyfile(str(module.__file__), pkg / Path(str(module.__file__)).name)
    return app_dir


def fedlora_run_config(
    rounds: int, nodes: int, privacy: str, out_dir: Path, sizes: Mapping[str, str] = SIZES
) -> dict[str, Any]:
    """Return the ``flwr run`` run config of fedlora's app for this benchmark."""
    overrides = {
        **sizes,
        **(DP if privacy == "record" else {}),
        "federation.num_clients": str(nodes),
        "federation.num_rounds": str(rounds),
        "federation.node_wait_timeout": "600",
    }
    return {
        "scenario": "simulations/default.toml",
        "out-dir": str(out_dir),
        "overrides": overrides_string(overrides),
    }


def run_arm(
    arm: str, privacy: str, rounds: int, nodes: int, work: Path, sizes: Mapping[str, str] = SIZES
) -> dict[str, Any]:
    """Deploy one arm in ``work`` and run it to the end; return its measurements."""
    from benchmarks.deploy_overhead import ENV
    from experiments.baselines.plain_flower import CONFIG_ENV
    from fedlora.deploy.fleet import Fleet
    from server.app import config_from_run_config

    work.mkdir(parents=True, exist_ok=True)
    run_config = fedlora_run_config(rounds, nodes, privacy, work / "run", sizes)
    cfg = config_from_run_config(run_config)  # the plain app gets exactly fedlora's config
    config_file = work / "config.json"
    config_file.write_text(cfg.to_json(), encoding="utf-8")
    plain = arm.startswith("plain")
    meter_file = work / "meter.json"
    if plain:
        app_dir = build_plain_app(work / "app")
        run_config = {"meter-file": str(meter_file), "reply-poll": 0.1 if arm == "plain-poll" else 0.0}
    else:
        app_dir = ROOT
    node_configs = {
        f"node-{i}": {"partition-id": i, "num-partitions": nodes, "state-dir": str(work / f"state-{i}")}
        for i in range(nodes)
    }
    with Fleet(work / "fleet", extra_env={**ENV, CONFIG_ENV: str(config_file)}) as fleet:
        fleet.start_superlink()
        started = fleet.add_nodes(node_configs, worker=not plain)
        fleet.wait_for_nodes(timeout=600)
        with NodeRss([n.process.popen.pid for n in started]) as rss:
            result = fleet.run_app(app_dir, run_config, timeout=1800)
        if not result.ok:
            raise RuntimeError(
                f"{arm}/{privacy} failed: {result.status}\n{result.logs[-3000:]}\n{fleet.log_tails()}"
            )
    if plain:
        meter = json.loads(meter_file.read_text(encoding="utf-8"))
        per_round = plain_rounds(meter)
        reply_metrics = [c["metrics"] for c in meter["calls"] if str(c["type"]).startswith("train")]
    else:
        lines = (work / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        per_round = fedlora_rounds([json.loads(line) for line in lines if line.strip()])
        reply_metrics = []
    return {
        "arm": arm,
        "privacy": privacy,
        "rounds": per_round,
        "steady": steady_state(per_round),
        "run_wall_s": round(result.elapsed_s, 1),
        "bytes_per_round_median": statistics.median(r["bytes"] for r in per_round),
        "peak_node_rss_mib": round(max(rss.peak.values()) / 2**20),
        "final_accuracy": per_round[-1]["accuracy"],
        "reply_metrics": reply_metrics,
        "load_average_after": round(psutil.getloadavg()[0], 2),
    }


def table(arms: Mapping[str, Mapping[str, Any]], ups: Mapping[str, float]) -> str:
    """Return the Markdown table of the arms (see the module docstring for each column)."""
    from benchmarks.harness import markdown_table

    header = [
        "system",
        "privacy",
        "s/round median (rounds 2..R)",
        "s/round min",
        "speed-up vs plain (median)",
        "run wall s",
        "MiB per round (down+up)",
        "peak node RSS MiB",
        "final accuracy",
    ]
    rows = []
    for key, a in arms.items():
        rows.append(
            [
                ARMS[a["arm"]],
                "record DP σ=1" if a["privacy"] == "record" else "no DP",
                round(a["steady"]["median_s"], 2),
                round(a["steady"]["min_s"], 2),
                round(ups[key], 2) if key in ups else "-",
                a["run_wall_s"],
                round(a["bytes_per_round_median"] / 2**20, 3),
                a["peak_node_rss_mib"],
                round(float(a["final_accuracy"]), 3) if a["final_accuracy"] is not None else "-",
            ]
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    """Run the arms (see the module docstring); write ``baseline_deploy.json`` and ``.md``."""
    from benchmarks.harness import machine, write_result
    from experiments import RESULTS_DIR

    parser = argparse.ArgumentParser(
        prog="python -m experiments.baseline_deploy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds per run (>= 2; round 1 is left out)")
    parser.add_argument("--nodes", type=int, default=2, help="SuperNodes per deployment")
    parser.add_argument(
        "--arms", default="plain,fedlora", help=f"comma-separated subset of {', '.join(ARMS)}"
    )
    parser.add_argument("--privacy", default="none", help="comma-separated subset of none, record")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="result directory")
    parser.add_argument(
        "--overrides",
        default="",
        help="space-separated section.key=value pairs changing SIZES for both apps (e.g. a smoke run)",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep the deployments here (default: temp)"
    )
    args = parser.parse_args(argv)
    arm_names = [a.strip() for a in args.arms.split(",") if a.strip()]
    privacies = [p.strip() for p in args.privacy.split(",") if p.strip()]
    if args.rounds < FIRST_STEADY_ROUND:
        parser.error(f"--rounds must be at least {FIRST_STEADY_ROUND} (round 1 holds one-time work)")
    if args.nodes < 1:
        parser.error("--nodes must be at least 1")
    if unknown := set(arm_names) - set(ARMS):
        parser.error(f"unknown --arms {sorted(unknown)}; choose from {', '.join(ARMS)}")
    if unknown := set(privacies) - set(PRIVACY):
        parser.error(f"unknown --privacy {sorted(unknown)}; choose from {', '.join(PRIVACY)}")
    sizes = {**SIZES, **parse_overrides(args.overrides)}
    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedlora-baseline-deploy-"))
    load_before = round(psutil.getloadavg()[0], 2)
    t0 = time.perf_counter()
    arms: dict[str, dict[str, Any]] = {}
    for privacy in privacies:
        for arm in arm_names:
            print(f"running {arm} / {privacy} ...", flush=True)
            arms[f"{arm}/{privacy}"] = run_arm(
                arm, privacy, args.rounds, args.nodes, work / f"{arm}-{privacy}", sizes
            )
            arm_file = work / f"{arm}-{privacy}" / "arm.json"  # kept even if a later arm fails
            arm_file.write_text(json.dumps(arms[f"{arm}/{privacy}"], indent=2) + "\n", encoding="utf-8")
            s = arms[f"{arm}/{privacy}"]["steady"]
            print(
                f"  {arm} / {privacy}: median {s['median_s']:.2f} s/round, min {s['min_s']:.2f}", flush=True
            )
    ups = speedups(arms)
    result = {
        "sizes": sizes,
        "dp": DP,
        "rounds": args.rounds,
        "nodes": args.nodes,
        "arms": arms,
        "speedup_vs_plain_median": {k: round(v, 3) for k, v in ups.items()},
        "target_speedup": TARGET_SPEEDUP,
        "target_met": {k: v >= TARGET_SPEEDUP for k, v in ups.items() if k.startswith("fedlora/")},
        "load_average_before": load_before,
        "wall_seconds": round(time.perf_counter() - t0, 1),
        "machine": machine(),
    }
    md = table(arms, ups)
    path = write_result(NAME, result, md, args.out)
    print(f"{md}\n\n-> {path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
