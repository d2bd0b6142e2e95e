r"""A local Flower deployment made of real processes, for tests and walk-throughs.

``Fleet`` starts a SuperLink (TLS + SuperNode authentication by default), registers
SuperNode public keys through the Control API, starts SuperNodes, submits a Flower App
run with the ``flwr`` CLI (:mod:`fedlora.deploy.flwr_cli`), waits for it, collects logs,
and always cleans up: every process runs in its own session and is killed together with
its descendants (``flower-superexec``, ``flwr-serverapp``, ``flwr-clientapp``) on
``stop()``, on leaving the ``with`` block, and at interpreter exit.

The commands it runs are the ones a real deployment uses (:mod:`fedlora.deploy.commands`).
Each component gets its own ``FLWR_HOME`` (as on separate machines); the CLI's
connection lives in ``<workdir>/cli-home/config.toml`` (see ``write_connection``).
Example::

    with Fleet(tmp_path) as fleet:
        fleet.start_superlink()
        fleet.add_nodes({f"node-{i}": {"partition-id": i, "num-partitions": 2} for i in range(2)})
        fleet.wait_for_nodes()
        result = fleet.run_app(app_dir, {"num-server-rounds": 2}, timeout=120)
        assert result.ok, result.logs
"""

from __future__ import annotations

import atexit
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlora.deploy import certs, gateway, nodekeys
from fedlora.deploy.commands import superlink_command, supernode_command
from fedlora.deploy.flwr_cli import ConfigArg, FlwrCli, RunResult, config_arg, write_connection
from fedlora.deploy.processes import (
    FleetError,
    ManagedProcess,
    exe,
    free_port,
    join_host_port,
    process_env,
    read_log,
    spawn_logged,
    stop_processes,
    wait_for_port,
)


@dataclass
class FleetNode:
    """A SuperNode started by ``Fleet.add_node``/``add_nodes``."""

    name: str
    process: ManagedProcess
    port: int
    node_id: int | None = None
    key_paths: nodekeys.NodeKeyPaths | None = None
    state_dir: Path | None = None  # with worker=True: the node's state dir (ledger, SuperExec secret)


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
    gateway : bool
        Put the Fleet gateway (:mod:`fedlora.deploy.gateway`, nginx) on ``host``: the SuperLink
        then listens on 127.0.0.1 only, SuperNodes dial the gateway, which forwards Fleet
        requests and nothing else, and the operator's CLI uses the loopback Control API.
    """

    workdir: Path
    tls: bool = True
    node_auth: bool = True
    host: str = "127.0.0.1"
    sans: Sequence[str] = certs.DEFAULT_SANS
    extra_env: Mapping[str, str] = field(default_factory=dict)
    connection: str = "fedlora-local"
    gateway: bool = False
    processes: list[ManagedProcess] = field(default_factory=list, init=False)
    nodes: dict[str, FleetNode] = field(default_factory=dict, init=False)
    port: int | None = field(default=None, init=False)
    superlink: ManagedProcess | None = field(default=None, init=False)
    pki: certs.PkiPaths | None = field(default=None, init=False)
    control_port: int | None = field(default=None, init=False)  # the SuperLink's own port
    gateway_process: ManagedProcess | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.gateway and not self.tls:
            raise ValueError("The Fleet gateway serves TLS only; use tls=True or gateway=False.")
        if self.node_auth and not self.tls:
            raise ValueError(
                "SuperNode authentication needs TLS (Flower refuses --enable-supernode-auth with "
                "--insecure); use tls=True or node_auth=False."
            )
        self.workdir = Path(self.workdir).resolve()
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self._run_count = 0

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
    def cli(self) -> FlwrCli:
        """The operator's ``flwr`` CLI, bound to this fleet's connection."""
        return FlwrCli(env=self._env(self.cli_home), cwd=self.workdir, connection=self.connection)

    @property
    def address(self) -> str:
        """``host:port`` SuperNodes dial: the gateway's (Fleet only), else the SuperLink's (all APIs)."""
        if self.port is None:
            raise FleetError("The SuperLink is not started; call start_superlink() first.")
        return join_host_port(self.host, self.port)

    @property
    def control_address(self) -> str:
        """``host:port`` of the SuperLink's Control API, which the operator's CLI uses."""
        if self.control_port is None:
            raise FleetError("The SuperLink is not started; call start_superlink() first.")
        return join_host_port(self._superlink_host, self.control_port)

    @property
    def _superlink_host(self) -> str:
        return "127.0.0.1" if self.gateway else self.host

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
        link_host = self._superlink_host
        self.control_port = free_port(link_host) if self.gateway else self.port
        pki = self.pki if self.tls else None
        db = home / "state.db"
        cmd = superlink_command(link_host, self.control_port, db, pki=pki, node_auth=self.node_auth)
        self.superlink = self._spawn("superlink", cmd, home / "flwr-home")
        wait_for_port(link_host, self.control_port, self.superlink, timeout)
        if self.gateway:
            self._start_gateway(timeout)
        self.write_cli_connection()
        return self.superlink

    def _start_gateway(self, timeout: float) -> ManagedProcess:
        """Start the Fleet gateway (nginx) on ``host:port`` in front of the loopback SuperLink."""
        if self.pki is None or self.port is None or self.control_port is None:
            raise FleetError("The gateway needs the SuperLink's certificates and ports; start the SuperLink.")
        spec = gateway.GatewaySpec(self.host, self.port, "127.0.0.1", self.control_port, pki=self.pki)
        config = gateway.write_gateway_config(spec, self.workdir / "gateway")
        gateway.check_config(config)
        cmd = gateway.gateway_command(config)
        self.gateway_process = self._spawn("gateway", cmd, self.workdir / "gateway")
        wait_for_port(self.host, self.port, self.gateway_process, timeout)
        return self.gateway_process

    def write_cli_connection(self) -> Path:
        """Write this fleet's connection as the default into the CLI's config.toml."""
        root = str(self.pki.ca_cert) if self.tls and self.pki else None
        return write_connection(self.cli_home, self.connection, self.control_address, root_certificates=root)

    # ------------------------------------------------------------------ SuperNodes

    def add_node(self, name: str, node_config: ConfigArg = None, **options: Any) -> FleetNode:
        """Create keys for, optionally register, and start one SuperNode (see ``add_nodes``)."""
        return self.add_nodes({name: node_config}, **options)[0]

    def add_nodes(
        self,
        node_configs: Mapping[str, ConfigArg],
        *,
        register: bool = True,
        private_key: Path | None = None,
        insecure: bool = False,
        root_certificates: Path | None = None,
        max_retries: int | None = None,
        max_wait_time: float | None = None,
        worker: bool = False,
    ) -> list[FleetNode]:
        """Create keys for, register (concurrently) and start SuperNodes.

        Parameters
        ----------
        node_configs : Mapping[str, ConfigArg]
            Node name (key file names, log file, ``flwr supernode register --name``) ->
            ``--node-config``: a mapping (written to a TOML file), a ``"k=v k2=v2"``
            string, or a path to a TOML file.
        register : bool
            Register the nodes' public keys with the SuperLink first (with node auth).
        private_key : Path | None
            Use this OpenSSH private key (not registered here) instead of new pairs.
        insecure : bool
            Dial the SuperLink over plain HTTP (``--insecure``), without auth keys.
        root_certificates : Path | None
            CA bundle to trust instead of the fleet's CA.
        max_retries, max_wait_time : int | None, float | None
            Bound the nodes' connection retries (``None``: Flower's default, unlimited).
        worker : bool
            Start each node with ``fedlora node`` (SuperNode + warm worker,
            :mod:`fedlora.deploy.node`) instead of plain ``flower-supernode``; its state dir
            is the node config's ``state-dir``, else ``nodes/<name>/state``.

        Returns
        -------
        list[FleetNode]
            The nodes, in the order given; ``node_id`` is set for registered nodes.
        """
        for name in node_configs:
            nodekeys.check_node_name(name)
            self._check_new_node(name)
        keys: dict[str, nodekeys.NodeKeyPaths] = {}
        if self.node_auth and not insecure and private_key is None:
            keys = {
                name: nodekeys.write_node_keys(self.workdir / "pki" / "nodes", name, force=True)
                for name in node_configs
            }
        ids = self.register_nodes({n: k.public_key for n, k in keys.items()}) if keys and register else {}
        started = []
        for name, node_config in node_configs.items():
            key = keys[name].private_key if name in keys else private_key
            node_dir = self.workdir / "nodes" / name
            node_dir.mkdir(parents=True, exist_ok=True)
            port = free_port("127.0.0.1")  # the node's own Runtime API (ClientApp <-> SuperNode)
            cmd = supernode_command(
                self.address,
                port=port,
                insecure=insecure,
                root_certificates=None if insecure else (root_certificates or self._ca_path()),
                private_key=None if insecure else key,
                node_config=config_arg(node_config, node_dir / "node-config.toml"),
                max_retries=max_retries,
                max_wait_time=max_wait_time,
            )
            state_dir = None
            if worker:
                state_dir = _state_dir(node_config) or node_dir / "state"
                cmd = [exe("fedlora"), "node", "--state-dir", str(state_dir), *cmd[1:]]
            process = self._spawn(f"node-{name}", cmd, node_dir / "flwr-home")
            node = FleetNode(name, process, port, ids.get(name), keys.get(name), state_dir)
            self.nodes[name] = node
            started.append(node)
        return started

    def register_nodes(self, public_keys: Mapping[str, Path], timeout: float = 120.0) -> dict[str, int]:
        """Register public keys concurrently with ``flwr supernode register``; return name -> node ID."""
        if not self.node_auth:
            raise FleetError("This fleet runs without node authentication; nodes register themselves.")
        return self.cli.register_nodes(public_keys, timeout=timeout)

    def list_nodes(self) -> list[dict[str, Any]]:
        """Return ``flwr supernode ls`` as a list of dicts (``node-id``, ``status``, ...)."""
        return self.cli.list_nodes()

    def wait_for_nodes(self, count: int | None = None, timeout: float = 60.0) -> list[FleetNode]:
        """Wait until ``count`` of this fleet's SuperNodes (default: all) are connected; return them.

        A SuperNode logs ``SuperNode ID: <id>`` right after the SuperLink activated it, so this
        watches the logs (``list_nodes()`` confirms: ``status`` is ``online``). A registered node
        that exits ends the wait at once; after ``timeout`` seconds ``FleetError`` carries every
        log's tail.
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
        """Run the app in ``app_dir`` to completion with ``flwr run --stream``.

        ``run_config`` is a mapping (written to TOML), a ``"k=v"`` string or a TOML path; after
        ``timeout`` seconds the run is stopped and ``FleetError`` raised. The result holds the run
        ID, its final status (``ok`` when ``finished:completed``), details and streamed logs.
        """
        config = self._next_run_config(run_config)
        log_path = self.logs_dir / f"run-{self._run_count}.log"
        start = time.monotonic()
        try:
            run_id = self.cli.stream(app_dir, config, log_path, timeout)
        except FleetError as err:
            raise FleetError(f"{err}\n{self.log_tails()}") from None
        details = self.run_status(run_id)
        status = str(details.get("status", "unknown"))
        return RunResult(run_id, status, details, read_log(log_path), time.monotonic() - start)

    def submit_run(self, app_dir: Path, run_config: ConfigArg = None) -> int:
        """Submit a run without waiting (``flwr run --format json``); return its run ID."""
        return self.cli.submit(app_dir, self._next_run_config(run_config))

    def run_status(self, run_id: int) -> dict[str, Any]:
        """Return ``flwr ls --run-id`` for one run (``status`` is e.g. ``finished:completed``)."""
        return self.cli.run_status(run_id)

    def wait_for_run(self, run_id: int, timeout: float = 300.0, poll: float = 2.0) -> dict[str, Any]:
        """Poll until run ``run_id`` is finished; return its details."""
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            details = self.run_status(run_id)
            if str(details.get("status", "")).startswith("finished"):
                return details
            if time.monotonic() > deadline:
                self.cli.stop_run(run_id)
                raise FleetError(f"Run {run_id} not finished after {timeout:.0f} s.\n" + self.log_tails())
            time.sleep(poll)

    def run_logs(self, run_id: int) -> str:
        """Return the run's ServerApp logs as stored by the SuperLink (``flwr log --show``)."""
        return self.cli.run_logs(run_id)

    # ------------------------------------------------------------------ CLI, logs, cleanup

    def flwr(
        self, *args: str, timeout: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run the ``flwr`` CLI with the fleet's private FLWR_HOME."""
        return self.cli.run(*args, timeout=timeout, check=check)

    def flwr_json(self, *args: str, timeout: float = 120.0) -> dict[str, Any]:
        """Run a ``flwr ... --format json`` command and return its JSON; raise if it failed."""
        return self.cli.json(*args, timeout=timeout)

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
        # the gateway goes with the SuperLink, after the nodes, so they can deregister through it
        tail = [p for p in (self.gateway_process, self.superlink) if p is not None]
        stop_processes([p for p in self.processes if p not in tail], last=None, grace=grace)
        stop_processes(tail, last=self.superlink, grace=grace)
        self.processes.clear()
        self.superlink = None
        self.gateway_process = None
        atexit.unregister(self.stop)

    # ------------------------------------------------------------------ internals

    def _check_new_node(self, name: str) -> None:
        if self.superlink is None:
            raise FleetError("Start the SuperLink before adding nodes: call start_superlink().")
        if name in self.nodes:
            raise ValueError(f"A node named {name!r} already exists; node names must be unique.")

    def _next_run_config(self, run_config: ConfigArg) -> str | None:
        self._run_count += 1
        return config_arg(run_config, self.workdir / f"run-config-{self._run_count}.toml")

    def _spawn(self, name: str, cmd: list[str], flwr_home: Path) -> ManagedProcess:
        atexit.unregister(self.stop)  # (re-)arm clean-up at interpreter exit, once
        atexit.register(self.stop)
        process = spawn_logged(name, cmd, self.logs_dir / f"{name}.log", self._env(flwr_home), flwr_home)
        self.processes.append(process)
        return process

    def _env(self, flwr_home: Path) -> dict[str, str]:
        return process_env(flwr_home, self.extra_env)

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
        if self.gateway_process is not None and not self.gateway_process.alive:
            code = self.gateway_process.popen.returncode
            tail = self.gateway_process.log()[-4000:]
            raise FleetError(f"The Fleet gateway exited with code {code}.\n{tail}")


def _state_dir(node_config: ConfigArg) -> Path | None:
    """Return ``state-dir`` of a mapping node config, if it sets one."""
    if isinstance(node_config, Mapping) and node_config.get("state-dir"):
        return Path(str(node_config["state-dir"]))
    return None


if __name__ == "__main__":
    from fedlora.deploy.cli import fleet_main

    sys.exit(fleet_main())
