"""``fedlora node``: one edge node, a Flower SuperNode plus the worker that keeps the model warm.

Takes ``flower-supernode``'s flags (``--superlink``, ``--root-certificates``,
``--auth-supernode-private-key``, ``--node-config``, ...; any other flag is passed through)
and ``--state-dir``, the node's own directory: its privacy ledger (``state-dir`` is added to
the node config unless it sets one) and the worker's socket (``<state-dir>/worker/``, mode
0700). Then it:

1. starts the worker (``python -m fedlora.deploy.worker``) and waits until it has
   imported the training stack and listens, so the first round already goes to it;
2. starts ``flower-supernode`` with ``FEDLORA_WORKER_SOCKET`` in its environment, which
   every ``flwr-clientapp`` it spawns inherits (:func:`clients.worker.delegate`);
3. restarts the worker whenever it exits (a killed worker loses no accounting: the ledger
   lives in the state dir and in Flower's ``context.state``, never only in the worker), and
   stops both when the SuperNode exits or on SIGTERM/SIGINT, returning the SuperNode's code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType

import tomli_w

from fedlora.deploy.commands import supernode_command
from fedlora.deploy.processes import kill_trees
from fedlora.deploy.worker import SOCKET_ENV, secure_dir, socket_path_for

READY_LIMIT_S = 600.0  # a worker not listening by then: the SuperNode starts anyway (in-process rounds)
RESTART_BACKOFF_S = (1.0, 30.0)  # first and largest pause before restarting a worker that exited


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``fedlora node`` (unknown flags go to ``flower-supernode``)."""
    p = argparse.ArgumentParser(
        prog="fedlora node",
        description="Run a SuperNode with a warm worker that keeps the base model loaded across rounds.",
    )
    p.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    p.add_argument("--state-dir", type=Path, required=True, help="node's directory: ledger, worker socket")
    p.add_argument("--root-certificates", type=Path, help="CA certificate of the SuperLink (TLS)")
    p.add_argument("--auth-supernode-private-key", type=Path, help="node authentication key (OpenSSH)")
    p.add_argument("--insecure", action="store_true", help="plain HTTP (local experiments only)")
    p.add_argument("--node-config", default=None, help="'k=v k2=v2' or a TOML file")
    p.add_argument("--port", type=int, default=None, help="the node's own Runtime API port")
    p.add_argument("--max-retries", type=int, default=None, help="connection retries before giving up")
    p.add_argument("--max-wait-time", type=float, default=None, help="seconds of retrying before giving up")
    p.add_argument("--no-worker", action="store_true", help="no worker: every round loads the model anew")
    return p


def with_state_dir(node_config: str | None, state_dir: Path) -> str:
    """Return ``node_config`` with ``state-dir`` set to ``state_dir`` unless it sets one already.

    A TOML file is rewritten to ``<state_dir>/node-config.toml``; a ``k=v`` string is extended.
    """
    if node_config and node_config.endswith(".toml"):
        values = tomllib.loads(Path(node_config).read_text("utf-8"))
        values.setdefault("state-dir", str(state_dir))
        merged = state_dir / "node-config.toml"
        merged.write_text(tomli_w.dumps(values), "utf-8")
        return str(merged)
    text = node_config or ""
    if "state-dir=" in text:
        return text
    return f"{text} state-dir={json.dumps(str(state_dir))}".strip()


class NodeRunner:
    """The SuperNode and worker processes of one ``fedlora node``."""

    def __init__(self, supernode_cmd: list[str], socket_path: Path | None) -> None:
        self.supernode_cmd = supernode_cmd
        self.socket_path = socket_path
        self.worker: subprocess.Popen[bytes] | None = None
        self.supernode: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts = 0

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the node's SuperExec starts a ClientApp process within this many seconds of a message
        # (Flower's default is 1 s, a fixed cost on every round)
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        if self.socket_path is not None:
            env[SOCKET_ENV] = str(self.socket_path)
        return env

    def start_worker(self) -> None:
        """Start the worker and wait until it listens (or exits, or READY_LIMIT_S passes)."""
        assert self.socket_path is not None
        self.socket_path.unlink(missing_ok=True)  # a killed worker's socket: not a sign of life
        cmd = [sys.executable, "-m", "fedlora.deploy.worker", "--socket", str(self.socket_path)]
        self.worker = subprocess.Popen(cmd, env=self._env(), stdin=subprocess.DEVNULL)
        waited = 0.0
        while not self.socket_path.exists() and self.worker.poll() is None and waited < READY_LIMIT_S:
            time.sleep(0.1)
            waited += 0.1
        state = "listening" if self.socket_path.exists() else f"not ready (exit code {self.worker.poll()})"
        print(f"fedlora node: worker {self.worker.pid} {state} on {self.socket_path}", flush=True)

    def run(self) -> int:
        """Start both, supervise until the SuperNode exits or a signal arrives; return its exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            if self.socket_path is not None:
                self.start_worker()
            self.supernode = subprocess.Popen(self.supernode_cmd, env=self._env(), stdin=subprocess.DEVNULL)
            pause = RESTART_BACKOFF_S[0]
            while not self.stopping and self.supernode.poll() is None:
                if self.worker is not None and self.worker.poll() is not None:
                    code = self.worker.returncode
                    print(f"fedlora node: worker exited with code {code}; restarting", flush=True)
                    time.sleep(pause)
                    pause = min(2 * pause, RESTART_BACKOFF_S[1])
                    self.restarts += 1
                    self.start_worker()
                elif self.worker is not None and self.socket_path and self.socket_path.exists():
                    pause = RESTART_BACKOFF_S[0]
                time.sleep(0.2)
        finally:
            self.stop()
        assert self.supernode is not None
        return int(self.supernode.returncode or 0)

    def stop(self, grace: float = 5.0) -> None:
        """Stop the SuperNode (it deregisters), then the worker, each with its descendants."""
        for proc in (self.supernode, self.worker):
            if proc is not None and proc.poll() is None:
                kill_trees([proc.pid], grace=grace)
            if proc is not None:
                try:
                    proc.wait(grace)
                except subprocess.TimeoutExpired:
                    pass

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stopping = True


def node_main(argv: list[str] | None = None) -> int:
    """Run ``fedlora node``; return the SuperNode's exit code (2 for a usage error)."""
    args, passthrough = build_parser().parse_known_args(argv)
    state_dir = args.state_dir.resolve()
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        socket_path = None if args.no_worker else socket_path_for(state_dir)
        if socket_path is not None:
            secure_dir(socket_path.parent)
        node_config = with_state_dir(args.node_config, state_dir)
    except (OSError, ValueError) as err:
        print(f"fedlora node: error: {err}", file=sys.stderr)
        return 2
    cmd = supernode_command(
        args.superlink,
        port=args.port,
        insecure=args.insecure,
        root_certificates=args.root_certificates,
        private_key=args.auth_supernode_private_key,
        node_config=node_config,
        max_retries=args.max_retries,
        max_wait_time=args.max_wait_time,
    )
    return NodeRunner([*cmd, *passthrough], socket_path).run()


if __name__ == "__main__":
    sys.exit(node_main())
