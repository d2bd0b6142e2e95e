"""Command lines of the deployment tooling: ``fedlora certs`` and ``python -m fedlora.deploy.fleet``.

``fedlora node`` lives in :mod:`fedlora.deploy.node`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fedlora.deploy import certs, nodekeys


def build_certs_parser(prog: str = "fedlora certs") -> argparse.ArgumentParser:
    """Return the argument parser of ``fedlora certs``."""
    parser = argparse.ArgumentParser(
        prog=prog, description="Create TLS certificates and SuperNode authentication keys."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{init,server,node}")
    san_help = (
        "DNS name or IP address of the SuperLink (repeatable). "
        f"Default: {' '.join(certs.DEFAULT_SANS)}. Include every name/IP that SuperNodes and the flwr CLI "
        "use."
    )
    init = sub.add_parser("init", help="create a CA and a SuperLink server certificate")
    init.add_argument("--out", required=True, type=Path, help="output directory")
    init.add_argument("--san", action="append", default=None, help=san_help)
    init.add_argument("--force", action="store_true", help="overwrite existing files")

    server = sub.add_parser("server", help="re-issue the server certificate from an existing CA")
    server.add_argument("--out", required=True, type=Path, help="directory holding ca.crt/ca.key")
    server.add_argument("--san", action="append", default=None, help=san_help)

    node = sub.add_parser("node", help="create a SuperNode authentication key pair")
    node.add_argument("--out", required=True, type=Path, help="output directory")
    node.add_argument("--name", required=True, help="node name, used for the file names")
    node.add_argument("--force", action="store_true", help="overwrite existing files")
    return parser


def certs_main(argv: list[str] | None = None) -> int:
    """Run ``fedlora certs``; return a process exit code.

    Parameters
    ----------
    argv : list[str] | None
        Arguments after ``certs`` (``sys.argv[1:]`` if None).

    Returns
    -------
    int
        0 on success, 1 on a reported error.
    """
    args = build_certs_parser().parse_args(argv)
    try:
        if args.command == "init":
            paths = certs.init_pki(args.out, tuple(args.san or certs.DEFAULT_SANS), force=args.force)
            _print_pki(paths)
        elif args.command == "server":
            paths = certs.issue_server_files(args.out, tuple(args.san or certs.DEFAULT_SANS))
            _print_pki(paths)
        else:
            node = nodekeys.write_node_keys(args.out, args.name, force=args.force)
            print(f"private key (keep on the node, pass to --auth-supernode-private-key): {node.private_key}")
            print(f"public key (register on the SuperLink with `flwr supernode register`): {node.public_key}")
    except (OSError, ValueError) as err:
        print(f"fedlora certs: error: {err}", file=sys.stderr)
        return 1
    return 0


def _print_pki(paths: certs.PkiPaths) -> None:
    print(f"CA certificate (copy to every SuperNode and operator): {paths.ca_cert}")
    print(f"CA private key (keep offline; signs server certificates): {paths.ca_key}")
    print(f"SuperLink certificate: {paths.server_cert}")
    print(f"SuperLink private key: {paths.server_key}")


def fleet_main(argv: list[str] | None = None) -> int:
    """Run an app once on a throw-away local fleet: ``python -m fedlora.deploy.fleet --app DIR``.

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
    from fedlora.deploy.fleet import Fleet

    parser = argparse.ArgumentParser(prog="python -m fedlora.deploy.fleet", description=fleet_main.__doc__)
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
