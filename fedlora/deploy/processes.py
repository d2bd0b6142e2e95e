"""Processes of a local Flower deployment: start-up checks, logs and tree-wide clean-up.

Used by :mod:`fedlora.fleet`. Flower starts some helpers (``flower-superexec``) in new
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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
