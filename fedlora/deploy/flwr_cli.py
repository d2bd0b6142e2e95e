"""The operator's ``flwr`` CLI (Flower 1.42), driven as a subprocess with a private FLWR_HOME.

:class:`FlwrCli` runs ``flwr`` commands against one SuperLink connection and decodes
their ``--format json`` answers; :func:`write_connection` writes that connection into
``<FLWR_HOME>/config.toml``. Used by :class:`fedlora.deploy.fleet.Fleet`; usable on its
own against a real SuperLink.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from fedlora.deploy.processes import FleetError, exe, kill_trees, read_log, strip_ansi

ConfigArg = Mapping[str, Any] | str | Path | None
RUN_COMPLETED = "finished:completed"


@dataclass
class RunResult:
    """Outcome of a run followed to its end (``Fleet.run_app``)."""

    run_id: int
    status: str
    details: dict[str, Any]
    logs: str
    elapsed_s: float

    @property
    def ok(self) -> bool:
        """Whether the run finished with status ``finished:completed``."""
        return self.status == RUN_COMPLETED


@dataclass
class FlwrCli:
    """``flwr`` commands against the SuperLink connection ``connection``.

    Parameters
    ----------
    env : Mapping[str, str]
        Full environment of every ``flwr`` process (holds ``FLWR_HOME``).
    cwd : Path
        Working directory of every ``flwr`` process.
    connection : str
        Name of the connection in ``$FLWR_HOME/config.toml``.
    """

    env: Mapping[str, str]
    cwd: Path
    connection: str

    def run(self, *args: str, timeout: float = 120.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``flwr ARGS``; raise ``FleetError`` on a timeout or (with ``check``) a non-zero exit."""
        try:
            proc = subprocess.run(
                [exe("flwr"), *args],
                capture_output=True,
                text=True,
                env=dict(self.env),
                cwd=self.cwd,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise FleetError(f"`flwr {' '.join(args)}` timed out after {timeout:.0f} s.") from err
        if check and proc.returncode != 0:
            raise FleetError(
                f"`flwr {' '.join(args)}` failed with exit code {proc.returncode}:\n"
                f"{strip_ansi(proc.stdout + proc.stderr)[-4000:]}"
            )
        return proc

    def json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a ``flwr ... --format json`` command and return its JSON; raise if it failed.

        With ``--format json`` the CLI exits 0 even on failure and reports
        ``"success": false`` with an ``error-message``, so both are checked.
        """
        proc = self.run(*args, timeout=timeout)
        payload = last_json(proc.stdout)
        if payload.get("success") is False:
            message = strip_ansi(str(payload.get("error-message", payload)))
            raise FleetError(f"`flwr {' '.join(args)}` failed: {message}")
        return payload

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """Start ``flwr ARGS`` without waiting; stdout and stderr are pipes."""
        return subprocess.Popen(
            [exe("flwr"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=dict(self.env),
            cwd=self.cwd,
        )

    # ------------------------------------------------------------------ SuperNodes

    def register_nodes(self, public_keys: Mapping[str, Path], timeout: float = 300.0) -> dict[str, int]:
        """Register public keys concurrently with ``flwr supernode register``; return name -> node ID."""
        launched = {
            name: self.popen(
                "supernode", "register", str(key), self.connection, "--name", name, "--format", "json"
            )
            for name, key in public_keys.items()
        }
        ids: dict[str, int] = {}
        for name, proc in launched.items():
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                for other in launched.values():
                    other.kill()
                raise FleetError(f"Registering node {name!r} timed out after {timeout:.0f} s.") from None
            payload = last_json(out + err)
            if proc.returncode != 0 or not payload.get("success"):
                raise FleetError(f"Registering node {name!r} failed: {strip_ansi(out + err)[-2000:]}")
            ids[name] = int(payload["node-id"])
        return ids

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return ``flwr supernode ls`` as a list of dicts (``node-id``, ``status``, ...)."""
        return list(self.json("supernode", "ls", self.connection, "--format", "json").get("nodes", []))

    # ------------------------------------------------------------------ runs

    def run_args(self, app_dir: Path, config_arg: str | None) -> list[str]:
        """Return ``run APP CONNECTION [--run-config C]``, shared by streamed and submitted runs."""
        args = ["run", str(Path(app_dir).resolve()), self.connection]
        return [*args, "--run-config", config_arg] if config_arg else args

    def submit(self, app_dir: Path, config_arg: str | None) -> int:
        """Submit a run without waiting (``flwr run --format json``); return its run ID."""
        return int(self.json(*self.run_args(app_dir, config_arg), "--format", "json")["run-id"])

    def stream(self, app_dir: Path, config_arg: str | None, log_path: Path, timeout: float) -> int:
        """Run to completion with ``flwr run --stream`` into ``log_path``; return the run ID.

        Raises
        ------
        FleetError
            If no run started, or it did not finish within ``timeout`` seconds (it is then stopped).
        """
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [exe("flwr"), *self.run_args(app_dir, config_arg), "--stream"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(self.env),
                cwd=self.cwd,
                start_new_session=True,
            )
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_trees([proc.pid], grace=2.0)
                run_id = started_run_id(read_log(log_path))
                if run_id is not None:
                    self.stop_run(run_id)
                raise FleetError(f"Run did not finish within {timeout:.0f} s (run id {run_id}).") from None
        run_id = started_run_id(read_log(log_path))
        if run_id is None:
            logs = read_log(log_path)
            raise FleetError(f"`flwr run` did not start a run (exit code {proc.returncode}):\n{logs[-4000:]}")
        return run_id

    def run_status(self, run_id: int) -> dict[str, Any]:
        """Return ``flwr ls --run-id`` for one run (``status`` is e.g. ``finished:completed``)."""
        runs = self.json("ls", self.connection, "--run-id", str(run_id), "--format", "json").get("runs", [])
        if not runs:
            raise FleetError(f"The SuperLink does not know run {run_id}.")
        return dict(runs[0])

    def stop_run(self, run_id: int) -> None:
        """Ask the SuperLink to stop a run (``flwr stop``); errors are ignored."""
        self.run("stop", str(run_id), self.connection, check=False)

    def run_logs(self, run_id: int) -> str:
        """Return the run's ServerApp logs as stored by the SuperLink (``flwr log --show``)."""
        return strip_ansi(self.run("log", str(run_id), self.connection, "--show").stdout)


# ---------------------------------------------------------------------- module functions


def write_connection(
    flwr_home: Path,
    name: str,
    address: str,
    *,
    root_certificates: Path | str | None = None,
    insecure: bool = False,
    make_default: bool = True,
) -> Path:
    """Add or replace a SuperLink connection in ``<flwr_home>/config.toml``.

    Flower 1.42's CLI reads connections from ``[superlink.<name>]`` tables with keys
    ``address`` (``host:port``), ``root-certificates`` (absolute path) and ``insecure``;
    ``[superlink] default`` names the one used when a command omits it.

    Parameters
    ----------
    flwr_home : Path
        The CLI's FLWR_HOME (``~/.flwr`` by default).
    name : str
        Connection name, used as ``flwr run . <name>``.
    address : str
        ``host:port`` of the SuperLink.
    root_certificates : Path, str or None
        CA certificate that signed the SuperLink's certificate (made absolute).
    insecure : bool
        Plain HTTP; only for local experiments.
    make_default : bool
        Also set ``[superlink] default``.

    Returns
    -------
    Path
        The config file.
    """
    if insecure and root_certificates is not None:
        raise ValueError("A connection is either insecure or has root certificates, not both.")
    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = tomllib.loads(path.read_text("utf-8")) if path.exists() else {}
    section = config.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    if insecure:
        entry["insecure"] = True
    section[name] = entry
    if make_default:
        section["default"] = name
    path.write_text(tomli_w.dumps(config), "utf-8")
    return path


def config_arg(config: ConfigArg, toml_path: Path) -> str | None:
    """Turn a run/node config into a CLI argument: a TOML file path or a ``k=v`` string.

    A mapping is written to ``toml_path``; a ``Path`` is passed as is (absolute); a string
    is a ``"k=v k2=v2"`` list.
    """
    if config is None:
        return None
    if isinstance(config, Path):
        return str(config.resolve())
    if isinstance(config, str):
        return config or None
    toml_path.parent.mkdir(parents=True, exist_ok=True)
    toml_path.write_text(tomli_w.dumps(dict(config)), "utf-8")
    return str(toml_path)


def started_run_id(text: str) -> int | None:
    """Return the run ID from ``flwr run``'s "Successfully started run N" line, if any."""
    match = re.search(r"Successfully started run (\d+)", text)
    return int(match.group(1)) if match else None


def last_json(text: str) -> dict[str, Any]:
    """Parse the JSON object the flwr CLI prints (after any human-readable lines)."""
    start = text.find("{")
    if start < 0:
        raise FleetError(f"Expected JSON from the flwr CLI, got:\n{text[-2000:]}")
    return dict(json.loads(text[start:]))
