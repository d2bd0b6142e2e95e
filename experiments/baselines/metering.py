"""Run ``fedlora simulate`` or the plain Flower app once, measured the same way from its messages.

Both ServerApps get their ``Grid`` wrapped in a :class:`MeterGrid`, which records, for every
``send_and_receive``: message type, start and end time, bytes of the arrays sent and received
(the serialised ``ArrayRecord`` payloads, :func:`fedlora.protocol_arrays.record_bytes`), each
reply's metrics, and the resident memory of the whole process tree (driver + Ray workers) when
the replies are in. From those records :func:`summarize` derives what the benchmarks report:

* **seconds per round**: the time between the starts of consecutive train rounds (client
  training, aggregation, central evaluation and checkpointing of one round), so the start-up
  (Ray, imports, querying the nodes) is left out and reported separately; also the **CPU
  seconds** the process tree (driver + Ray workers) spent in that interval, which other jobs on a
  shared machine hardly disturb;
* **bytes per round**: down + up of one round's train messages;
* **memory**: peak tree RSS over the run (sampled every 0.25 s) and its growth per client-round
  between the end of the first and of the last round.

One run per process (Ray and the model caches start fresh)::

    python -m experiments.baselines.metering fedlora CONFIG.json OUT.json
    python -m experiments.baselines.metering plain CONFIG.json OUT.json

``CONFIG.json`` is a :class:`fedlora.config.RunConfig` (``to_json()``).
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psutil
from flwr.app import Message
from flwr.serverapp import Grid

from benchmarks.harness import PeakRss, tree_rss
from experiments.baselines.plain_deploy_app import call_record
from fedlora.config import RunConfig, from_json
from server.grid import PollingGrid


def tree_cpu_seconds() -> float:
    """Return the CPU time (user + system, seconds) of this process and its live descendants.

    Unlike wall time it hardly changes when other jobs share the cores, so it measures the work a
    round costs on a busy machine (Ray's workers are descendants of the driver).
    """
    total = 0.0
    proc = psutil.Process()
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


class MeterGrid(PollingGrid):
    """A ``Grid`` that records every ``send_and_receive`` (see the module docstring) in ``calls``.

    A :class:`~server.grid.PollingGrid`, so fedlora's ServerApp uses it as it is; its
    ``send_and_receive`` still goes through the wrapped grid's own (Flower's simulation grid
    pulls every 0.1 s), so both systems are metered with the same polling.
    """

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.calls: list[dict[str, Any]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send through the wrapped grid and record the call."""
        msgs = list(messages)
        cpu0 = tree_cpu_seconds()
        t0 = time.perf_counter()
        replies = list(self.inner.send_and_receive(msgs, timeout=timeout))
        t1 = time.perf_counter()
        self.calls.append(
            {
                **call_record(msgs, replies),
                "start": t0,
                "cpu_start": cpu0,
                "end": t1,
                "rss_after": tree_rss(),
                "rss_driver_after": psutil.Process().memory_info().rss,
            }
        )
        return replies


def summarize(calls: list[dict[str, Any]], t_start: float, t_end: float, peak_rss: int) -> dict[str, Any]:
    """Return per-round time, bytes and memory from a :class:`MeterGrid`'s calls (see module doc)."""
    rounds = [c for c in calls if c["type"].startswith("train")]
    if not rounds:
        raise RuntimeError("the run sent no train messages; see its log")
    starts = [c["start"] for c in rounds]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    cpu = [c.get("cpu_start", 0.0) for c in rounds]
    cpu_gaps = [b - a for a, b in itertools.pairwise(cpu)]
    rss = [c["rss_after"] for c in rounds]
    later_client_rounds = sum(c["replies"] for c in rounds[1:])
    return {
        "rounds": len(rounds),
        "round_seconds": [round(g, 2) for g in gaps],
        "seconds_per_round_min": round(min(gaps), 2) if gaps else None,
        "seconds_per_round_median": round(statistics.median(gaps), 2) if gaps else None,
        "round_cpu_seconds": [round(g, 2) for g in cpu_gaps],
        "cpu_seconds_per_round_min": round(min(cpu_gaps), 2) if cpu_gaps else None,
        "startup_seconds": round(starts[0] - t_start, 1),
        "wall_seconds": round(t_end - t_start, 1),
        "bytes_per_round": [c["bytes_down"] + c["bytes_up"] for c in rounds],
        "bytes_down_per_round": [c["bytes_down"] for c in rounds],
        "bytes_up_per_round": [c["bytes_up"] for c in rounds],
        "clients_per_round": [c["replies"] for c in rounds],
        "errors": sum(c["errors"] for c in calls),
        "rss_after_round_mib": [round(r / 2**20) for r in rss],
        "driver_rss_after_round_mib": [round(c.get("rss_driver_after", 0) / 2**20) for c in rounds],
        "rss_growth_per_client_round_mib": round((rss[-1] - rss[0]) / 2**20 / later_client_rounds, 1)
        if later_client_rounds
        else None,
        "peak_rss_mib": round(peak_rss / 2**20),
        "client_metrics": [c["metrics"] for c in rounds],
        "query_calls": [
            {"messages": c["messages"], "seconds": round(c["end"] - c["start"], 2)}
            for c in calls
            if c["messages"] and not c["type"].startswith("train")
        ],
    }


def _metered_app(main: Any, grids: list[MeterGrid]) -> Any:
    """Return a ServerApp running ``main(grid, context)`` on a metered grid (kept in ``grids``)."""
    from flwr.app import Context
    from flwr.serverapp import ServerApp

    app = ServerApp()

    @app.main()
    def metered(grid: Grid, context: Context) -> None:
        grids.append(MeterGrid(grid))
        main(grids[-1], context)

    return app


def run_fedlora(cfg: RunConfig) -> dict[str, Any]:
    """Run ``fedlora simulate``'s runner in-process with a metered grid; return the measurements."""
    import simulations.runner as runner
    from server.app import main as server_main
    from server.outputs import read_metrics

    grids: list[MeterGrid] = []
    # The runner builds its ServerApp here; the metered one replaces its console progress only.
    runner._server_app_with_progress = lambda progress, num_rounds: _metered_app(server_main, grids)
    with PeakRss(interval=0.25) as mem:
        t0 = time.perf_counter()
        run_dir = runner.simulate(cfg)
        t1 = time.perf_counter()
    out = summarize(grids[0].calls, t0, t1, mem.peak)
    rows = read_metrics(run_dir / "metrics.jsonl")
    final = [r for r in rows if r["kind"] == "global"][-1]
    out["final_accuracy"] = final["test_accuracy"]
    if cfg.privacy.mode != "none":
        out["reported_epsilon"] = {str(k): float(v) for k, v in final.get("dp_epsilon", {}).items()}
    out["run_dir"] = str(run_dir)
    return out


def run_plain(cfg: RunConfig, config_file: Path) -> dict[str, Any]:
    """Run the plain Flower app in Flower's simulation engine with a metered grid."""
    from flwr.simulation import run_simulation

    from experiments.baselines import plain_flower
    from simulations.console import quiet_environment
    from simulations.runner import _backend_config

    os.environ[plain_flower.CONFIG_ENV] = str(config_file)  # inherited by the Ray workers
    logs = quiet_environment(None)
    grids: list[MeterGrid] = []
    with PeakRss(interval=0.25) as mem:
        t0 = time.perf_counter()
        run_simulation(
            server_app=_metered_app(plain_flower.main, grids),
            client_app=plain_flower.client_app,
            num_supernodes=cfg.federation.num_clients,
            backend_config=_backend_config(cfg, 0.0, 0.0, None, logs),  # same resources as fedlora
            verbose_logging=False,
        )
        t1 = time.perf_counter()
    out = summarize(grids[0].calls, t0, t1, mem.peak)
    out["final_accuracy"] = plain_flower.EVALUATIONS[-1][1]
    return out


def run_isolated(kind: str, cfg: RunConfig, work: Path, timeout: float) -> dict[str, Any]:
    """Run ``kind`` (``fedlora`` or ``plain``) for ``cfg`` in a fresh Python process; return its result.

    Raises
    ------
    RuntimeError
        If the process failed or timed out, with the tail of its log.
    """
    work.mkdir(parents=True, exist_ok=True)
    config_file, out_file, log_file = work / "config.json", work / "result.json", work / "log.txt"
    config_file.write_text(cfg.to_json(), encoding="utf-8")
    cmd = [sys.executable, "-m", "experiments.baselines.metering", kind, str(config_file), str(out_file)]
    root = Path(__file__).resolve().parents[2]
    # Ray workers inherit the environment: with the project root first on their path, `benchmarks`
    # is this package and not the `benchmarks` package that Opacus' wheel installs.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    with log_file.open("w", encoding="utf-8") as log:
        try:
            proc = subprocess.run(
                cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout
            )
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"{kind} run timed out after {timeout:.0f} s; log: {log_file}") from err
    if proc.returncode != 0 or not out_file.exists():
        tail = log_file.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{kind} run failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(out_file.read_text(encoding="utf-8"))


def main(argv: list[str]) -> int:
    """``KIND CONFIG.json OUT.json``: one measured run, result written as JSON."""
    kind, config_file, out_file = argv[0], Path(argv[1]), Path(argv[2])
    cfg = from_json(config_file.read_text(encoding="utf-8"))
    if kind == "fedlora":
        result = run_fedlora(cfg)
    elif kind == "plain":
        result = run_plain(cfg, config_file)
    else:
        raise SystemExit(f"unknown kind {kind!r}: use 'fedlora' or 'plain'")
    out_file.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
