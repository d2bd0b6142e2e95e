"""Processes of a local Flower deployment: start-up checks, logs and tree-wide clean-up.

Used by :mod:`fedlora.deploy.fleet`. Flower starts some helpers (``flower-superexec``) in new
sessions, so killing a component means collecting its whole process tree first.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
BASE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONIOENCODING": "utf-8",
    "COLUMNS": "200",
}


class FleetError(RuntimeError):
    """A fleet process failed to start, died, or a run did not complete in time."""


@dataclass
class ManagedProcess:
    """One process started by the fleet, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.popen.poll() is None

    def log(self) -> str:
        """Return the process log so far (ANSI colour codes removed)."""
        return read_log(self.log_path)

    def wait(self, timeout: float) -> int:
        """Wait for the process to exit and return its exit code.

        Raises
        ------
        subprocess.TimeoutExpired
            If it is still running after ``timeout`` seconds.
        """
        return self.popen.wait(timeout)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free on ``host`` right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def strip_ansi(text: str) -> str:
    """Remove ANSI colour codes (Flower's CLI colours its output)."""
    return _ANSI.sub("", text)


def read_log(path: Path) -> str:
    """Read a log file as text with ANSI colour codes removed."""
    try:
        return _ANSI.sub("", path.read_text("utf-8", errors="replace"))
    except FileNotFoundError:
        return ""


def kill_trees(pids: Sequence[int], grace: float) -> None:
    """SIGTERM processes, their process groups and all descendants together; SIGKILL survivors.

    Descendants are collected first because Flower starts some of them in new
    sessions (the SuperLink's ``flower-superexec``), outside the parent's group.
    """
    family: list[psutil.Process] = []
    groups: set[int] = set()
    for pid in pids:
        groups.add(pid)  # started with start_new_session: its group outlives it (e.g. a node that exited)
        try:
            root = psutil.Process(pid)
            family += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    for proc in family:
        try:
            groups.add(os.getpgid(proc.pid))
        except (ProcessLookupError, PermissionError):
            pass
    groups.discard(os.getpgrp())  # never signal our own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        for group in groups:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in family:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        _, family = psutil.wait_procs(family, timeout=wait)
        if not family:
            return


def wait_for_port(host: str, port: int, process: ManagedProcess, timeout: float) -> None:
    """Wait until ``process`` listens on ``host:port``; fail early if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive:
            raise FleetError(
                f"{process.name} exited with code {process.popen.returncode} during start-up:\n"
                f"{process.log()[-4000:]}"
            )
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    raise FleetError(
        f"{process.name} did not listen on {host}:{port} within {timeout:.0f} s:\n{process.log()}"
    )


def join_host_port(host: str, port: int) -> str:
    """Return ``host:port``, bracketing IPv6 literals."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def exe(name: str) -> str:
    """Return the console script ``name`` of this interpreter's environment."""
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    return name


def process_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return this process' environment plus :data:`BASE_ENV`, ``extra`` and ``FLWR_HOME``.

    This interpreter's ``bin`` directory goes first on ``PATH``: Flower starts
    ``flower-superexec`` / ``flwr-serverapp`` / ``flwr-clientapp`` by name.
    """
    env = dict(os.environ)
    env.update(BASE_ENV)
    env.update(extra or {})
    env["FLWR_HOME"] = str(flwr_home)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def spawn_logged(
    name: str, cmd: list[str], log_path: Path, env: Mapping[str, str], home: Path
) -> ManagedProcess:
    """Start ``cmd`` in its own session, stdout and stderr appended to ``log_path``.

    ``home`` (the component's FLWR_HOME) is created; the process runs in its parent
    directory. Its own process group lets :func:`kill_trees` stop it as a unit.
    """
    home.mkdir(parents=True, exist_ok=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        log_file.write(f"$ {' '.join(cmd)}\n".encode())
        log_file.flush()
        popen = subprocess.Popen(
            cmd,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            cwd=home.parent,
            start_new_session=True,
        )
    return ManagedProcess(name=name, popen=popen, log_path=log_path)


def stop_processes(processes: Sequence[ManagedProcess], last: ManagedProcess | None, grace: float) -> None:
    """Kill every process tree, ``last`` (the SuperLink) after the others, and reap them."""
    first = [p for p in processes if p is not last]
    for batch in (first, [p for p in processes if p is last]):
        kill_trees([p.popen.pid for p in batch], grace=grace)
        for process in batch:
            try:
                process.popen.wait(1.0)  # reap
            except subprocess.TimeoutExpired:
                pass
