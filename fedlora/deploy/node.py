"""``fedlora node``: one edge node, a Flower SuperNode plus the worker that keeps the model warm.

Takes ``flower-supernode``'s flags (``--superlink``, ``--root-certificates``,
``--auth-supernode-private-key``, ``--node-config``, ...; any other flag is passed through)
and ``--state-dir``, the node's own directory: its privacy ledger (``state-dir`` is added to
the node config unless it sets one) and, in ``<state-dir>/worker/`` (mode 0700), the node's
SuperExec secret. Then it:

1. writes a fresh random SuperExec secret (0600) and starts ``flower-supernode --isolation
   process --superexec-auth-secret-file <secret>``: the SuperNode then starts no ClientApp
   processes itself, and hands a task only to a caller that signs with that secret;
2. starts the worker (``python -m clients.worker``, :mod:`clients.worker`), which takes every
   ClientApp task from the SuperNode's local Runtime API and runs it in its own long-lived
   process, so the base model stays loaded across rounds;
3. restarts the worker whenever it exits (back-off 1 s doubling to 30 s; a killed worker loses
   no accounting: the ledger lives in the state dir and in Flower's ``context.state``). A worker
   that exits :data:`FALLBACK_AFTER` times in a row within :data:`FAST_EXIT_S` of its start is
   replaced by Flower's own ``flower-superexec`` (a fresh process per message: slower, same
   result). Both stop when the SuperNode exits or on SIGTERM/SIGINT; the exit code is the
   SuperNode's.

``--no-worker`` runs plain ``flower-supernode`` (subprocess isolation, a process per message).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from types import FrameType

import tomli_w

from fedlora.atomic import atomic_write_text, owned_dir
from fedlora.deploy.commands import supernode_command
from fedlora.deploy.processes import exe, kill_trees

DEFAULT_PORT = 9094  # flower-supernode's default Runtime API port
RESTART_BACKOFF_S = (1.0, 30.0)  # first and largest pause before restarting a worker that exited
FAST_EXIT_S = 30.0  # a worker that exits sooner than this after its start did not get going
FALLBACK_AFTER = 3  # ... and after this many such exits in a row, Flower's SuperExec takes over
SECRET_NAME = "superexec.secret"


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``fedlora node`` (unknown flags go to ``flower-supernode``)."""
    p = argparse.ArgumentParser(
        prog="fedlora node",
        description="Run a SuperNode with a warm worker that keeps the base model loaded across rounds.",
    )
    p.add_argument("--superlink", required=True, help="host:port of the SuperLink")
    p.add_argument("--state-dir", type=Path, required=True, help="node's directory: ledger, SuperExec secret")
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
        # 0600, never through a link: it names the node's data file and privacy target.
        return str(atomic_write_text(state_dir / "node-config.toml", tomli_w.dumps(values)))
    text = node_config or ""
    if "state-dir=" in text:
        return text
    return f"{text} state-dir={json.dumps(str(state_dir))}".strip()


class NodeRunner:
    """The SuperNode and worker processes of one ``fedlora node``."""

    def __init__(
        self,
        supernode_cmd: list[str],
        worker_cmd: list[str] | None,
        fallback_cmd: list[str],
        backoff: tuple[float, float] = RESTART_BACKOFF_S,
    ) -> None:
        self.backoff = backoff
        self.supernode_cmd = supernode_cmd
        self.worker_cmd = worker_cmd
        self.fallback_cmd = fallback_cmd
        self.worker: subprocess.Popen[bytes] | None = None
        self.supernode: subprocess.Popen[bytes] | None = None
        self.stopping = False
        self.restarts = 0
        self.fast_exits = 0
        self.worker_started = 0.0

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # the fallback SuperExec starts a ClientApp process within this many seconds of a task
        # (Flower's default is 1 s, a fixed cost on every round)
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        return env

    def start_worker(self) -> None:
        """Start the worker, or Flower's SuperExec once the worker keeps dying at start."""
        assert self.worker_cmd is not None
        fallback = self.fast_exits >= FALLBACK_AFTER
        cmd = self.fallback_cmd if fallback else self.worker_cmd
        self.worker = subprocess.Popen(cmd, env=self._env(), stdin=subprocess.DEVNULL)
        self.worker_started = time.monotonic()
        what = "flower-superexec (a process per message)" if fallback else "worker"
        print(f"fedlora node: {what} started, pid {self.worker.pid}", flush=True)

    def run(self) -> int:
        """Start both, supervise until the SuperNode exits or a signal arrives; return its exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            print(f"fedlora node: starting {' '.join(self.supernode_cmd)}", flush=True)
            self.supernode = subprocess.Popen(self.supernode_cmd, env=self._env(), stdin=subprocess.DEVNULL)
            if self.worker_cmd is not None:
                self.start_worker()
            pause = self.backoff[0]
            while not self.stopping and self.supernode.poll() is None:
                if self.worker is not None and self.worker.poll() is not None:
                    code = self.worker.returncode
                    uptime = time.monotonic() - self.worker_started
                    self.fast_exits = self.fast_exits + 1 if uptime < FAST_EXIT_S else 0
                    if uptime >= FAST_EXIT_S:
                        pause = self.backoff[0]
                    print(
                        f"fedlora node: worker exited with code {code} after {uptime:.0f} s; "
                        f"restarting in {pause:.0f} s",
                        flush=True,
                    )
                    time.sleep(pause)
                    pause = min(2 * pause, self.backoff[1])
                    self.restarts += 1
                    self.start_worker()
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


def secure_dir(path: Path) -> Path:
    """Create ``path`` with mode 0700, or check that an existing one is ours and private.

    Raises
    ------
    PermissionError
        If the directory is a symlink, belongs to another user, or others may open it.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.lstat()
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a plain directory; remove it so fedlora node can create it.")
    if info.st_uid != os.getuid():
        raise PermissionError(
            f"{path} belongs to uid {info.st_uid}, not {os.getuid()}; use another state dir."
        )
    if info.st_mode & 0o077:
        raise PermissionError(
            f"{path} has mode {stat.S_IMODE(info.st_mode):o}; other users could read the node's "
            f"SuperExec secret. Run `chmod 700 {path}` or remove the directory."
        )
    return path


def write_secret(path: Path) -> Path:
    """Write a fresh random SuperExec secret to ``path`` (mode 0600, in a private directory)."""
    secure_dir(path.parent)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    return path


def node_main(argv: list[str] | None = None) -> int:
    """Run ``fedlora node``; return the SuperNode's exit code (2 for a usage error)."""
    args, passthrough = build_parser().parse_known_args(argv)
    own = [a for a in passthrough if a.split("=")[0] in ("--isolation", "--superexec-auth-secret-file")]
    if own:
        print(
            f"fedlora node: error: {own[0].split('=')[0]} is set by fedlora node itself (process isolation "
            "with its worker); drop it, or pass --no-worker for Flower's subprocess isolation",
            file=sys.stderr,
        )
        return 2
    state_dir = args.state_dir.absolute()  # not resolved: a link there is refused, not followed
    try:
        owned_dir(state_dir)  # ours, not a link, not writable by others; tightened to 0700
        secret = None if args.no_worker else write_secret(state_dir / "worker" / SECRET_NAME)
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
    if secret is None:
        return NodeRunner([*cmd, *passthrough], None, []).run()
    address = f"127.0.0.1:{args.port or DEFAULT_PORT}"
    cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret)]
    common = ["--runtime-api-address", address, "--superexec-auth-secret-file", str(secret)]
    common += ["--parent-pid", str(os.getpid())]
    worker = [sys.executable, "-m", "clients.worker", *common]
    fallback = [exe("flower-superexec"), "--insecure", *common]
    return NodeRunner([*cmd, *passthrough], worker, fallback).run()


if __name__ == "__main__":
    sys.exit(node_main())
