"""Run the fedlora app on a local TLS fleet and report each SuperNode's peak memory.

Usage: python scripts/fleet_fedlora_smoke.py WORKDIR [--nodes 2] [--rounds 2] [--dp-mode record]

Peak memory of a node = the largest sum, over samples every 0.1 s, of the resident set
size (RSS) of its ``flower-supernode`` process and all descendants (``flower-superexec``,
``flwr-clientapp``). RSS counts shared library pages in every process, so the figure
is an upper bound of what the node needs.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psutil
import tomli_w

from fedlora.deploy.fleet import Fleet

APP_DIR = Path(__file__).resolve().parent.parent


def scenario(out_dir: Path, nodes: int, rounds: int, dp_mode: str) -> dict:
    """Return a small scenario: MiniLM, embedded task, few local steps, optional DP."""
    privacy = {"mode": dp_mode, "epsilon": 8.0, "delta": 1e-5} if dp_mode != "none" else {"mode": "none"}
    return {
        "model": {"name": "minilm", "task": "classification", "max_length": 32},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["query", "value"]},
        "data": {"source": "embedded", "num_train": 400, "num_test": 100, "partitioner": "iid"},
        "train": {"lr": 0.002, "batch_size": 16, "local_steps": 4, "device": "cpu"},
        "federation": {"num_clients": nodes, "num_rounds": rounds, "strategy": "fedit", "min_replies": nodes},
        "privacy": privacy,
        "output": {"out_dir": str(out_dir)},
    }


class PeakRss:
    """Sample the summed RSS of a process tree in a background thread."""

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                root = psutil.Process(self.pid)
                total = 0
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.NoSuchProcess:
                        pass
                self.peak = max(self.peak, total)
            except psutil.NoSuchProcess:
                return
            time.sleep(self.interval)

    def stop(self) -> int:
        """Stop sampling and return the peak in bytes."""
        self._stop.set()
        self._thread.join(2)
        return self.peak


def main() -> int:
    """Run the smoke test; return 0 if the run completed."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dp-mode", default="record", choices=["none", "record", "client"])
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    scenario_path = workdir / "scenario.toml"
    out_dir = workdir / "run-output"
    scenario_path.write_text(tomli_w.dumps(scenario(out_dir, args.nodes, args.rounds, args.dp_mode)))
    start = time.monotonic()
    with Fleet(workdir / "fleet", extra_env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as fleet:
        fleet.start_superlink()
        nodes = fleet.add_nodes(
            {f"node-{i}": {"partition-id": i, "num-partitions": args.nodes} for i in range(args.nodes)}
        )
        samplers = {n.name: PeakRss(n.process.popen.pid) for n in nodes}
        fleet.wait_for_nodes(timeout=300)
        result = fleet.run_app(
            APP_DIR, {"num-server-rounds": args.rounds, "scenario": str(scenario_path)}, timeout=args.timeout
        )
        peaks = {name: s.stop() for name, s in samplers.items()}
    print(result.logs[-3000:])
    total = time.monotonic() - start
    print(f"run {result.run_id}: {result.status}; run {result.elapsed_s:.0f} s, total {total:.0f} s")
    for name, peak in peaks.items():
        print(f"{name}: peak RSS of SuperNode + ClientApp tree {peak / 2**20:.0f} MiB")
    print(f"outputs: {sorted(p.name for p in out_dir.iterdir()) if out_dir.exists() else 'none'}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
