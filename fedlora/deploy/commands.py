r"""The Flower 1.42 command lines of a deployment, built in one place.

:class:`fedlora.deploy.fleet.Fleet` and ``fedlora node`` run exactly these::

    flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt \\
        --ssl-keyfile server.key --enable-supernode-auth \\
        --disable-runtime-dependency-installation --host H --port P --database state.db
    flwr supernode register node.pub CONNECTION          # fedlora.deploy.flwr_cli
    flower-supernode --superlink H:P --root-certificates ca.crt \\
        --auth-supernode-private-key node.key --node-config node.toml --port Q
    flwr run APP_DIR CONNECTION --run-config overrides.toml --stream
"""

from __future__ import annotations

from pathlib import Path

from fedlora.deploy.certs import PkiPaths
from fedlora.deploy.processes import exe


def superlink_command(
    host: str, port: int, database: Path, *, pki: PkiPaths | None, node_auth: bool
) -> list[str]:
    """Return the ``flower-superlink`` command: HTTPS with ``pki`` (plain HTTP if None).

    ``node_auth`` adds ``--enable-supernode-auth`` (only registered keys may connect);
    Flower refuses it without TLS. Runtime dependency installation is always off: it
    would ``uv sync`` the app's dependencies on every run.
    """
    if pki is None:
        cmd = [exe("flower-superlink"), "--insecure"]
    else:
        cmd = [exe("flower-superlink"), "--ssl-ca-certfile", str(pki.ca_cert)]
        cmd += ["--ssl-certfile", str(pki.server_cert), "--ssl-keyfile", str(pki.server_key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    cmd += ["--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    return [*cmd, "--database", str(database)]


def supernode_command(
    superlink: str,
    *,
    port: int | None = None,
    insecure: bool = False,
    root_certificates: Path | None = None,
    private_key: Path | None = None,
    node_config: str | None = None,
    max_retries: int | None = None,
    max_wait_time: float | None = None,
) -> list[str]:
    """Return the ``flower-supernode`` command for one node.

    Parameters
    ----------
    superlink : str
        ``host:port`` of the SuperLink's Fleet API.
    port : int | None
        The node's own Runtime API port (ClientApp <-> SuperNode); Flower's default if None.
    insecure : bool
        Dial over plain HTTP (``--insecure``); no certificates or keys are passed.
    root_certificates : Path | None
        CA that signed the SuperLink's certificate (TLS).
    private_key : Path | None
        OpenSSH private key for SuperNode authentication.
    node_config : str | None
        ``--node-config``: ``"k=v k2=v2"`` or a TOML file path.
    max_retries, max_wait_time : int | None, float | None
        Bound the node's connection retries (``None``: Flower's default, unlimited).

    Returns
    -------
    list[str]
        The command, ready for ``subprocess``.
    """
    cmd = [exe("flower-supernode"), "--superlink", superlink]
    if insecure:
        cmd.append("--insecure")
    else:
        if root_certificates is not None:
            cmd += ["--root-certificates", str(root_certificates)]
        if private_key is not None:
            cmd += ["--auth-supernode-private-key", str(private_key)]
    if node_config:
        cmd += ["--node-config", node_config]
    if port is not None:
        cmd += ["--port", str(port)]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_time is not None:
        cmd += ["--max-wait-time", str(max_wait_time)]
    return cmd
