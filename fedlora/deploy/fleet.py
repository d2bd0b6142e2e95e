r"""A local Flower deployment made of real processes, for tests and walk-throughs.

``Fleet`` starts a SuperLink (TLS + SuperNode authentication by default), registers
SuperNode public keys through the Control API, starts SuperNodes, submits a Flower
App run with the ``flwr`` CLI, waits for it, collects logs, and always cleans up:
every process runs in its own session and is killed together with its descendants
(``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) on ``stop()``, on
leaving the ``with`` block, and at interpreter exit.

The commands it runs are the ones a real deployment uses (Flower 1.42)::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt \\
        --ssl-keyfile server.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation --host H --port P --database state.db
    flwr supernode register node.pub CONNECTION
    flower-supernode --superlink H:P --root-certificates ca.crt \\
        --auth-supernode-private-key node.key --node-config node.toml --port Q
    flwr run APP_DIR CONNECTION --run-config overrides.toml --stream

Each component gets its own ``FLWR_HOME`` (as on separate machines); the CLI's
connection lives in ``<workdir>/cli-home/config.toml`` (see ``write_connection``).
Example::

    with Fleet(tmp_path) as fleet:
        fleet.start_superlink()
        for i in range(2):
            fleet.add_node(f"node-{i}", {"partition-id": i, "num-partitions": 2})
        fleet.wait_for_nodes()
        result = fleet.run_app(app_dir, {"num-server-rounds": 2}, timeout=120)
        assert result.ok, result.logs
"""

from __future__ import annotations

import atexit
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedlora import certs
from fedlora.processes import (
    FleetError,
    ManagedProcess,
    exe,
    free_port,
    join_host_port,
    kill_trees,
    read_log,
    strip_ansi,
    wait_for_port,
)

# Re-exported: tests and scripts import these from here.
__all__ = [
    "Fleet",
    "FleetError",
    "FleetNode",
    "ManagedProcess",
    "RunResult",
    "free_port",
    "read_log",
    "write_connection",
]

ConfigArg = Mapping[str, Any] | str | Path | None

BASE_ENV: dict[str, str] = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "PYTHONUNBUFFERED": "1",
    "PYTHONIOENCODING": "utf-8",
    "COLUMNS": "200",
}
RUN_COMPLETED = "finished:completed"


@dataclass
class FleetNode:
    """A SuperNode started by ``Fleet.add_node``."""

    name: str
    process: ManagedProcess
    port: int
    node_id: int | None = None
    key_paths: certs.NodeKeyPaths | None = None


@dataclass
class RunResult:
    """Outcome of ``Fleet.run_app``."""

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
class Fleet:
    """A SuperLink plus SuperNodes on this machine, cleaned up whatever happens.

    Parameters
    ----------
    workdir : Path
        Everything goes here: ``pki/`` (CA, server cert, node keys), ``logs/``,
        ``superlink/`` (state database, FLWR_HOME), ``nodes/<name>/``, ``cli-home/``.
    tls : bool
        Serve over HTTPS with a fresh CA (default). ``False`` runs ``--insecure``.
    node_auth : bool
        ``--enable-supernode-auth``: only registered public keys may connect.
    host : str
        Address the SuperLink binds to and clients dial.
    sans : sequence of str
        SANs of the generated server certificate.
    extra_env : Mapping[str, str]
        Added to every process' environment (e.g. ``HF_HUB_OFFLINE``).
    connection : str
        Name of the SuperLink connection written to the CLI's config.toml.
    """

    workdir: Path
    tls: bool = True
    node_auth: bool = True
    host: str = "127.0.0.1"
    sans: Sequence[str] = certs.DEFAULT_SANS
    extra_env: Mapping[str, str] = field(default_factory=dict)
    connection: str = "fedlora-local"
    processes: list[ManagedProcess] = field(default_factory=list, init=False)
    nodes: dict[str, FleetNode] = field(default_factory=dict, init=False)
    port: int | None = field(default=None, init=False)
    superlink: ManagedProcess | None = field(default=None, init=False)
    pki: certs.PkiPaths | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.node_auth and not self.tls:
            raise ValueError(
                "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with "
                "--insecure); use tls=True or node_auth=False."
            )
        self.workdir = Path(self.workdir).resolve()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._run_count = 0

    # ------------------------------------------------------------------ context management

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def logs_dir(self) -> Path:
        """Directory of the per-process log files."""
        return self.workdir / "logs"

    @property
    def cli_home(self) -> Path:
        """FLWR_HOME of the operator's ``flwr`` CLI (holds config.toml)."""
        return self.workdir / "cli-home"

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise FleetError("The SuperLink is not started; call start_superlink() first.")
        return join_host_port(self.host, self.port)

    # ------------------------------------------------------------------ SuperLink

    def start_superlink(self, timeout: float = 30.0, port: int | None = None) -> ManagedProcess:
        """Start ``flower-superlink`` and wait until it accepts connections.

        Parameters
        ----------
        timeout : float
            Seconds to wait for the port to accept connections.
        port : int | None
            Port to use; a free one if None.

        Returns
        -------
        ManagedProcess
            The SuperLink process.
        """
        if self.superlink is not None:
            raise FleetError("The SuperLink is already running.")
        home = self.workdir / "superlink"
        home.mkdir(parents=True, exist_ok=True)
        if self.tls and self.pki is None:
            self.pki = certs.init_pki(self.workdir / "pki", list(self.sans), force=True)
        self.port = port or free_port(self.host)
        cmd = [exe("flower-superlink"), *self._server_tls_args()]
        if self.node_auth:
            cmd.append("--enable-supernode-auth")
        cmd += [
            "--disable-runtime-dependency-installation",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--database",
            str(home / "state.db"),
        ]
        self.superlink = self._spawn("superlink", cmd, home / "flwr-home")
        wait_for_port(self.host, self.port, self.superlink, timeout)
        self.write_cli_connection()
        return self.superlink

    def write_cli_connection(self) -> Path:
        """Write this fleet's connection as the default into the CLI's config.toml."""
        root = str(self.pki.ca_cert) if self.tls and self.pki else None
        return write_connection(self.cli_home, self.connection, self.address, root_certificates=root)

    # ------------------------------------------------------------------ SuperNodes

    def add_node(
        self,
        name: str,
        node_config: ConfigArg = None,
        *,
        register: bool = True,
        private_key: Path | None = None,
        insecure: bool = False,
        root_certificates: Path | None = None,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
    ) -> FleetNode:
        """Create keys for, optionally register, and start one ``flower-supernode``.

        Parameters
        ----------
        name : str
            Node name (key file names, log file, ``flwr supernode register --name``).
        node_config : Mapping, str, Path or None
            ``--node-config``: a mapping (written to a TOML file), a ``"k=v k2=v2"``
            string, or a path to a TOML file.
        register : bool
            Register the node's public key with the SuperLink first (with node auth).
        private_key : Path | None
            Use this OpenSSH private key (not registered here) instead of a new pair.
        insecure : bool
            Dial the SuperLink over plain HTTP (``--insecure``), without auth keys.
        root_certificates : Path | None
            CA bundle to trust instead of the fleet's CA.
        max_retries, max_wait_time : int | None, float | None
            Bound the node's connection retries (``None``: Flower's default, unlimited).

        Returns
        -------
        FleetNode
            The node; ``node_id`` is set when it was registered.
        """
        self._check_new_node(name)
        keys = node_id = None
        if self.node_auth and not insecure and private_key is None:
            keys = certs.write_node_keys(self.workdir / "pki" / "nodes", name, force=True)
            private_key = keys.private_key
            if register:
                node_id = self.register_nodes({name: keys.public_key})[name]
        return self._start_node(
            name,
            node_config,
            private_key=None if insecure else private_key,
            insecure=insecure,
            root_certificates=root_certificates,
            max_retries=max_retries,
            max_wait_time=max_wait_time,
            node_id=node_id,
            keys=keys,
        )

    def add_nodes(self, node_configs: Mapping[str, ConfigArg]) -> list[FleetNode]:
        """Create, register (in parallel) and start several SuperNodes.

        Parameters
        ----------
        node_configs : Mapping[str, ConfigArg]
            Node name -> ``--node-config`` (see ``add_node``).

        Returns
        -------
        list[FleetNode]
            The nodes, in the order given.
        """
        for name in node_configs:
            self._check_new_node(name)
        keys = {
            name: certs.write_node_keys(self.workdir / "pki" / "nodes", name, force=True)
            if self.node_auth
            else None
            for name in node_configs
        }
        ids = self.register_nodes({n: k.public_key for n, k in keys.items() if k is not None})
        return [
            self._start_node(
                name,
                config,
                private_key=keys[name].private_key if keys[name] else None,
                node_id=ids.get(name),
                keys=keys[name],
            )
            for name, config in node_configs.items()
        ]

    def register_node(self, public_key: Path, name: str | None = None) -> int:
        """Register one SuperNode public key (``flwr supernode register``); return its node ID."""
        label = name or Path(public_key).stem
        return self.register_nodes({label: public_key})[label]

    def register_nodes(self, public_keys: Mapping[str, Path], timeout: float = 120.0) -> dict[str, int]:
        """Register public keys concurrently with ``flwr supernode register``.

        Parameters
        ----------
        public_keys : Mapping[str, Path]
            Node name -> OpenSSH public key file.
        timeout : float
            Seconds to wait for all registrations.

        Returns
        -------
        dict[str, int]
            Node name -> node ID assigned by the SuperLink.
        """
        if not self.node_auth:
            raise FleetError("This fleet runs without node authentication; nodes register themselves.")
        launched = {
            name: self._flwr_popen(
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
            payload = _last_json(out + err)
            if proc.returncode != 0 or not payload.get("success"):
                raise FleetError(f"Registering node {name!r} failed: {strip_ansi(out + err)[-2000:]}")
            ids[name] = int(payload["node-id"])
        return ids

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return ``flwr supernode ls`` as a list of dicts (``node-id``, ``status``, ...)."""
        return list(self.flwr_json("supernode", "ls", self.connection, "--format", "json").get("nodes", []))

    def wait_for_nodes(self, count: int | None = None, timeout: float = 60.0) -> list[FleetNode]:
        """Wait until ``count`` of this fleet's SuperNodes (default: all) are connected.

        A SuperNode logs ``SuperNode ID: <id>`` right after the SuperLink activated it,
        so this watches the logs instead of polling the Control API; confirm with
        ``list_nodes()`` if needed (its ``status`` is ``online``).

        Parameters
        ----------
        count : int | None
            How many nodes must be connected; all started nodes if None.
        timeout : float
            Seconds before ``FleetError`` (with every log's tail) is raised.

        Returns
        -------
        list[FleetNode]
            The connected nodes.
        """
        target = len(self.nodes) if count is None else count
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            connected = [n for n in self.nodes.values() if "SuperNode ID:" in n.process.log()]
            if len(connected) >= target:
                return connected
            if time.monotonic() > deadline:
                raise FleetError(
                    f"Only {len(connected)} of {target} SuperNodes connected within {timeout:.0f} s.\n"
                    + self.log_tails()
                )
            time.sleep(0.25)

    # ------------------------------------------------------------------ runs

    def run_app(self, app_dir: Path, run_config: ConfigArg = None, timeout: float = 300.0) -> RunResult:
        """Run a Flower App to completion with ``flwr run --stream``.

        Parameters
        ----------
        app_dir : Path
            Directory with the app's ``pyproject.toml``.
        run_config : Mapping, str, Path or None
            ``--run-config`` overrides (mapping written to TOML, ``"k=v"`` string, or TOML path).
        timeout : float
            Seconds before the run is stopped and ``FleetError`` raised.

        Returns
        -------
        RunResult
            Run ID, final status (``finished:completed`` when ``ok``), details and logs.
        """
        self._run_count += 1
        log_path = self.logs_dir / f"run-{self._run_count}.log"
        args = ["run", str(Path(app_dir).resolve()), self.connection]
        config_arg = _config_arg(run_config, self.workdir / f"run-config-{self._run_count}.toml")
        if config_arg:
            args += ["--run-config", config_arg]
        start = time.monotonic()
        with open(log_path, "wb") as log_file:
            proc = subprocess.Popen(
                [exe("flwr"), *args, "--stream"],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(self.cli_home),
                cwd=self.workdir,
                start_new_session=True,
            )
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                kill_trees([proc.pid], grace=2.0)
                run_id = _started_run_id(read_log(log_path))
                if run_id is not None:
                    self.flwr("stop", str(run_id), self.connection, check=False)
                raise FleetError(
                    f"Run did not finish within {timeout:.0f} s (run id {run_id}).\n" + self.log_tails()
                ) from None
        logs = read_log(log_path)
        run_id = _started_run_id(logs)
        if run_id is None:
            raise FleetError(f"`flwr run` did not start a run (exit code {proc.returncode}):\n{logs[-4000:]}")
        details = self.run_status(run_id)
        return RunResult(
            run_id=run_id,
            status=str(details.get("status", "unknown")),
            details=details,
            logs=logs,
            elapsed_s=time.monotonic() - start,
        )

    def submit_run(self, app_dir: Path, run_config: ConfigArg = None) -> int:
        """Submit a run without waiting (``flwr run --format json``); return its run ID."""
        self._run_count += 1
        args = ["run", str(Path(app_dir).resolve()), self.connection, "--format", "json"]
        config_arg = _config_arg(run_config, self.workdir / f"run-config-{self._run_count}.toml")
        if config_arg:
            args += ["--run-config", config_arg]
        return int(self.flwr_json(*args)["run-id"])

    def run_status(self, run_id: int) -> dict[str, Any]:
        """Return ``flwr ls --run-id`` for one run (``status`` is e.g. ``finished:completed``)."""
        runs = self.flwr_json("ls", self.connection, "--run-id", str(run_id), "--format", "json").get(
            "runs", []
        )
        if not runs:
            raise FleetError(f"The SuperLink does not know run {run_id}.")
        return dict(runs[0])

    def wait_for_run(self, run_id: int, timeout: float = 300.0, poll: float = 2.0) -> dict[str, Any]:
        """Poll until run ``run_id`` is finished; return its details."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            details = self.run_status(run_id)
            if str(details.get("status", "")).startswith("finished"):
                return details
            if time.monotonic() > deadline:
                self.flwr("stop", str(run_id), self.connection, check=False)
                raise FleetError(f"Run {run_id} not finished after {timeout:.0f} s.\n" + self.log_tails())
            time.sleep(poll)

    def run_logs(self, run_id: int) -> str:
        """Return the run's ServerApp logs as stored by the SuperLink (``flwr log --show``)."""
        return strip_ansi(self.flwr("log", str(run_id), self.connection, "--show").stdout)

    # ------------------------------------------------------------------ CLI, logs, cleanup

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI with the fleet's private FLWR_HOME."""
        try:
            proc = subprocess.run(
                [exe("flwr"), *args],
                capture_output=True,
                text=True,
                env=self._env(self.cli_home),
                cwd=self.workdir,
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

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a ``flwr ... --format json`` command and return its JSON; raise if it failed.

        With ``--format json`` the CLI exits 0 even on failure and reports
        ``"success": false`` with an ``error-message``, so both are checked.
        """
        proc = self.flwr(*args, timeout=timeout)
        payload = _last_json(proc.stdout)
        if payload.get("success") is False:
            message = strip_ansi(str(payload.get("error-message", payload)))
            raise FleetError(f"`flwr {' '.join(args)}` failed: {message}")
        return payload

    def collect_logs(self) -> dict[str, str]:
        """Return every process log by name."""
        return {p.name: p.log() for p in self.processes}

    def log_tails(self, chars: int = 2000) -> str:
        """Return the end of every process log, for error messages."""
        return "\n".join(f"--- {name} ---\n{text[-chars:]}" for name, text in self.collect_logs().items())

    def stop(self, grace: float = 5.0) -> None:
        """Stop all processes with their descendants, SuperNodes before the SuperLink; idempotent.

        Parameters
        ----------
        grace : float
            Seconds SuperNodes get to deregister after SIGTERM before SIGKILL.
        """
        link = [p for p in self.processes if p is self.superlink]
        others = [p for p in self.processes if p is not self.superlink]
        for batch in (others, link):
            kill_trees([p.popen.pid for p in batch], grace=grace)
            for process in batch:
                try:
                    process.popen.wait(1.0)  # reap
                except subprocess.TimeoutExpired:
                    pass
        self.processes.clear()
        self.superlink = None
        atexit.unregister(self.stop)

    # ------------------------------------------------------------------ internals

    def _check_new_node(self, name: str) -> None:
        certs.check_node_name(name)
        if self.superlink is None:
            raise FleetError("Start the SuperLink before adding nodes: call start_superlink().")
        if name in self.nodes:
            raise ValueError(f"A node named {name!r} already exists; node names must be unique.")

    def _start_node(
        self,
        name: str,
        node_config: ConfigArg,
        *,
        private_key: Path | None,
        insecure: bool = False,
        root_certificates: Path | None = None,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
        node_id: int | None = None,
        keys: certs.NodeKeyPaths | None = None,
    ) -> FleetNode:
        node_dir = self.workdir / "nodes" / name
        node_dir.mkdir(parents=True, exist_ok=True)
        port = free_port("127.0.0.1")  # the node's own Runtime API (ClientApp <-> SuperNode)
        cmd = [exe("flower-supernode"), "--superlink", self.address]
        if insecure:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(root_certificates or self._ca_path())]
            if private_key is not None:
                cmd += ["--auth-supernode-private-key", str(private_key)]
        config_arg = _config_arg(node_config, node_dir / "node-config.toml")
        if config_arg:
            cmd += ["--node-config", config_arg]
        cmd += ["--port", str(port)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries)]
        if max_wait_time is not None:
            cmd += ["--max-wait-time", str(max_wait_time)]
        process = self._spawn(f"node-{name}", cmd, node_dir / "flwr-home")
        node = FleetNode(name=name, process=process, port=port, node_id=node_id, key_paths=keys)
        self.nodes[name] = node
        return node

    def _flwr_popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [exe("flwr"), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            env=self._env(self.cli_home),
            cwd=self.workdir,
        )

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path) -> ManagedProcess:
        atexit.unregister(self.stop)  # (re-)arm clean-up at interpreter exit, once
        atexit.register(self.stop)
        flwr_home.mkdir(parents=True, exist_ok=True)
        log_path = self.logs_dir / f"{name}.log"
        with open(log_path, "ab") as log_file:
            log_file.write(f"$ {' '.join(cmd)}\n".encode())
            log_file.flush()
            popen = subprocess.Popen(
                cmd,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self._env(flwr_home),
                cwd=flwr_home.parent,
                start_new_session=True,  # own process group: killed as a unit in stop()
            )
        process = ManagedProcess(name=name, popen=popen, log_path=log_path)
        self.processes.append(process)
        return process

    def _env(self, flwr_home: Path) -> dict[str, str]:
        env = dict(os.environ)
        env.update(BASE_ENV)
        env.update(self.extra_env)
        env["FLWR_HOME"] = str(flwr_home)
        # Flower starts flower-superexec / flwr-serverapp / flwr-clientapp by name.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env

    def _server_tls_args(self) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        assert self.pki is not None  # set in start_superlink
        return [
            "--ssl-ca-certfile",
            str(self.pki.ca_cert),
            "--ssl-certfile",
            str(self.pki.server_cert),
            "--ssl-keyfile",
            str(self.pki.server_key),
        ]

    def _ca_path(self) -> Path:
        if not self.tls or self.pki is None:
            raise FleetError("This fleet runs without TLS; pass insecure=True to add_node().")
        return self.pki.ca_cert

    def _check_alive(self) -> None:
        for node in self.nodes.values():
            if node.node_id is not None and not node.process.alive:
                code = node.process.popen.returncode
                raise FleetError(
                    f"SuperNode {node.name} exited with code {code}.\n{node.process.log()[-4000:]}"
                )
        if self.superlink is not None and not self.superlink.alive:
            code = self.superlink.popen.returncode
            raise FleetError(f"The SuperLink exited with code {code}.\n{self.superlink.log()[-4000:]}")


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


def _config_arg(config: ConfigArg, toml_path: Path) -> str | None:
    """Turn a run/node config into a CLI argument: a TOML file path or a ``k=v`` string."""
    if config is None:
        return None
    if isinstance(config, Path):
        return str(config.resolve())
    if isinstance(config, str):
        return config or None
    toml_path.parent.mkdir(parents=True, exist_ok=True)
    toml_path.write_text(tomli_w.dumps(dict(config)), "utf-8")
    return str(toml_path)


def _started_run_id(text: str) -> int | None:
    match = re.search(r"Successfully started run (\d+)", text)
    return int(match.group(1)) if match else None


def _last_json(text: str) -> dict[str, Any]:
    """Parse the JSON object the flwr CLI prints (after any human-readable lines)."""
    start = text.find("{")
    if start < 0:
        raise FleetError(f"Expected JSON from the flwr CLI, got:\n{text[-2000:]}")
    return dict(json.loads(text[start:]))


# ---------------------------------------------------------------------- command line


def fleet_main(argv: list[str] | None = None) -> int:
    """Run an app once on a throw-away local fleet: ``python -m fedlora.fleet --app DIR``.

    Starts a TLS SuperLink with node authentication and ``--nodes`` registered
    SuperNodes, runs the app with ``flwr run --stream``, prints the log, stops
    everything. ``--node-config`` may use ``{i}`` (node index) and ``{n}`` (node count).

    Parameters
    ----------
    argv : list[str] | None
        Command-line arguments (``sys.argv[1:]`` if None).

    Returns
    -------
    int
        0 if the run finished with status ``finished:completed``, else 1.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m fedlora.fleet", description=fleet_main.__doc__)
    parser.add_argument("--app", type=Path, default=Path("."), help="Flower App directory (pyproject.toml)")
    parser.add_argument("--workdir", type=Path, required=True, help="where certificates, state and logs go")
    parser.add_argument("--nodes", type=int, default=2, help="number of SuperNodes")
    parser.add_argument(
        "--node-config",
        default="partition-id={i} num-partitions={n}",
        help="per-node --node-config template; {i} and {n} are substituted",
    )
    parser.add_argument("--run-config", default=None, help="'k=v k2=v2' or a TOML file")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds the run may take")
    args = parser.parse_args(argv)
    if args.nodes < 1:
        parser.error(f"--nodes must be at least 1, got {args.nodes}")
    with Fleet(args.workdir) as fleet:
        fleet.start_superlink()
        fleet.add_nodes({f"node-{i}": args.node_config.format(i=i, n=args.nodes) for i in range(args.nodes)})
        fleet.wait_for_nodes(timeout=300)
        result = fleet.run_app(args.app, args.run_config, timeout=args.timeout)
        print(result.logs)
        print(f"run {result.run_id}: {result.status} in {result.elapsed_s:.0f} s; logs in {fleet.logs_dir}")
        return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(fleet_main())
