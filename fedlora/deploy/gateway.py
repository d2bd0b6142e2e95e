r"""The Fleet gateway: a kept nginx in front of the SuperLink that lets nodes reach Fleet and nothing else.

Flower 1.42's ``flower-superlink`` serves its Fleet API (SuperNodes), Control API (``flwr run``,
``flwr ls``, ``flwr supernode register``) and Runtime API (``flower-superexec`` / the ServerApp)
from one uvicorn server on one ``--host``/``--port``; Control account authentication (OIDC) exists
only in Flower's enterprise edition, the open edition accepts every Control request
(``NoOpControlAuthnPlugin``), and the flwr CLI presents no client certificate. So whoever reaches
the SuperLink's port with ``ca.crt`` can register SuperNode keys, list runs and start runs, whose
code every node then executes.

The deployment therefore binds the SuperLink to loopback and puts this gateway on the public
address. It terminates TLS with the SuperLink's own server certificate and forwards only
``POST`` requests to the twelve Fleet endpoints (an exact list, matched on nginx's normalised path
and forwarded unchanged) to ``https://127.0.0.1:<internal port>``, verifying the SuperLink's
certificate against the deployment CA. Every other path (Control, Runtime, docs) gets ``403``.
SuperNode authentication keeps working: Flower signs each Fleet request in its own headers, which
the gateway passes through. The operator runs ``flwr`` on the SuperLink's host against the loopback
address (or through an SSH tunnel to it).

::

    flower-superlink ... --host 127.0.0.1 --port 9093        # Control, Runtime: loopback only
    python -m fedlora.deploy.gateway --pki pki --listen 0.0.0.0:9092 --superlink 127.0.0.1:9093 \
        --dir gateway                                          # nodes dial <public host>:9092
"""

from __future__ import annotations

import argparse
import ipaddress
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from fedlora.deploy.certs import PkiPaths
from fedlora.deploy.processes import join_host_port

# Flower 1.42's Fleet HTTP routes (flwr/superlink/routers/fleet/router.py), all POST.
FLEET_ENDPOINTS: tuple[str, ...] = (
    "register-node",
    "activate-node",
    "deactivate-node",
    "unregister-node",
    "send-node-heartbeat",
    "pull-messages",
    "push-messages",
    "get-run",
    "get-fab",
    "push-object",
    "pull-object",
    "confirm-message-received",
)
UPSTREAM_NAME = "localhost"  # the name the gateway checks in the loopback SuperLink's certificate
DEFAULT_MAX_BODY = "2g"  # one request carries at most one message object; adapters can be large
_TEMP_KINDS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
_NGINX_FALLBACKS = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


@dataclass(frozen=True)
class GatewaySpec:
    """What the gateway listens on and where it forwards.

    Parameters
    ----------
    listen_host, listen_port : str, int
        Public address SuperNodes dial (covered by the server certificate's SANs).
    upstream_host, upstream_port : str, int
        The SuperLink's ``--host``/``--port``; the host must be a loopback address.
    pki : PkiPaths
        Server certificate and key the gateway presents; the CA it checks the SuperLink with.
    max_body : str
        nginx ``client_max_body_size`` (e.g. ``"2g"``).
    """

    listen_host: str
    listen_port: int
    upstream_host: str
    upstream_port: int
    pki: PkiPaths
    max_body: str = DEFAULT_MAX_BODY

    def __post_init__(self) -> None:
        if not _is_loopback(self.upstream_host):
            raise ValueError(
                f"The SuperLink behind the gateway listens on {self.upstream_host!r}, which other "
                "machines can reach together with its Control API; start flower-superlink with "
                "--host 127.0.0.1 (or ::1)."
            )
        if (self.listen_host, self.listen_port) == (self.upstream_host, self.upstream_port):
            raise ValueError(
                f"The gateway and the SuperLink cannot both listen on "
                f"{join_host_port(self.listen_host, self.listen_port)}; give them different ports."
            )
        for port in (self.listen_port, self.upstream_port):
            if not 0 < port < 65536:
                raise ValueError(f"Port {port} is out of range; use 1-65535.")

    @property
    def address(self) -> str:
        """``host:port`` that SuperNodes pass to ``flower-supernode --superlink``."""
        return join_host_port(self.listen_host, self.listen_port)


def render_nginx_config(spec: GatewaySpec, state_dir: Path) -> str:
    """Return the nginx configuration of the gateway (runs in the foreground, files in ``state_dir``).

    Parameters
    ----------
    spec : GatewaySpec
        Addresses and certificates.
    state_dir : Path
        Absolute directory for nginx's pid file, logs and temporary request bodies.

    Returns
    -------
    str
        A complete ``nginx.conf``.
    """
    state = Path(state_dir).resolve()
    upstream = join_host_port(spec.upstream_host, spec.upstream_port)
    listen = join_host_port(spec.listen_host, spec.listen_port)
    endpoints = "|".join(FLEET_ENDPOINTS)
    temp = "\n".join(f"    {kind}_temp_path {state / 'tmp' / kind};" for kind in _TEMP_KINDS)
    return f"""# Generated by fedlora.deploy.gateway: SuperNodes reach the Fleet API and nothing else.
daemon off;
worker_processes 1;
pid {state / "nginx.pid"};
error_log {state / "error.log"} warn;
events {{
    worker_connections 1024;
}}
http {{
    access_log {state / "access.log"};
{temp}
    server_tokens off;
    upstream superlink {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen {listen} ssl;
        ssl_certificate {spec.pki.server_cert.resolve()};
        ssl_certificate_key {spec.pki.server_key.resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;
        client_max_body_size {spec.max_body};
        # Exact Fleet endpoints, matched on the normalised path; the request goes upstream unchanged.
        location ~ ^/v1/fleet/({endpoints})$ {{
            limit_except POST {{
                deny all;
            }}
            proxy_pass https://superlink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_ssl_verify on;
            proxy_ssl_trusted_certificate {spec.pki.ca_cert.resolve()};
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_session_reuse on;
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}
        # Control (run, ls, supernode register), Runtime (ServerApp) and everything else.
        location / {{
            return 403;
        }}
    }}
}}
"""


def write_gateway_config(spec: GatewaySpec, state_dir: Path) -> Path:
    """Write ``<state_dir>/nginx.conf`` (and the temp directories nginx needs); return its path."""
    check_upstream_name(spec.pki.server_cert)
    state = Path(state_dir).resolve()
    for kind in _TEMP_KINDS:
        (state / "tmp" / kind).mkdir(parents=True, exist_ok=True)
    path = state / "nginx.conf"
    path.write_text(render_nginx_config(spec, state), "utf-8")
    return path


def find_nginx() -> str:
    """Return the nginx executable, or raise ``FileNotFoundError`` saying how to install it."""
    found = shutil.which("nginx")
    if found:
        return found
    for candidate in _NGINX_FALLBACKS:
        if Path(candidate).exists():
            return candidate
    raise FileNotFoundError(
        "nginx is not installed; the Fleet gateway needs it (Debian/Ubuntu: apt-get install nginx)."
    )


def gateway_command(config_path: Path) -> list[str]:
    """Return the command that runs the gateway in the foreground with ``config_path``."""
    config = Path(config_path).resolve()
    state = config.parent
    return [find_nginx(), "-p", str(state), "-e", str(state / "error.log"), "-c", str(config)]


def check_config(config_path: Path) -> None:
    """Run ``nginx -t`` on the configuration; raise ``ValueError`` with nginx's message if it is bad."""
    proc = subprocess.run(
        [*gateway_command(config_path), "-t", "-q"], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise ValueError(f"nginx refuses the gateway configuration {config_path}:\n{proc.stderr.strip()}")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_upstream_name(server_cert: Path) -> None:
    """Raise ``ValueError`` unless the SuperLink's certificate names ``localhost`` (a DNS SAN).

    nginx 1.22 checks an upstream certificate against a host name only (never an IP SAN), so the
    gateway verifies the loopback SuperLink as ``localhost``, a default SAN of ``fedlora certs``.
    """
    cert = x509.load_pem_x509_certificate(Path(server_cert).read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        names = x509.SubjectAlternativeName([])
    if UPSTREAM_NAME not in names.get_values_for_type(x509.DNSName):
        raise ValueError(
            f"The server certificate {server_cert} does not name {UPSTREAM_NAME!r}, which the gateway "
            "checks on the loopback SuperLink; re-issue it with `fedlora certs server --out DIR "
            f"--san {UPSTREAM_NAME} --san <public name> ...`."
        )


def _split(address: str, flag: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{flag} {address!r} is not HOST:PORT (e.g. 0.0.0.0:9092).")
    return host.strip("[]"), int(port)


def gateway_main(argv: list[str] | None = None) -> int:
    """Write the gateway's nginx.conf and run nginx in the foreground: ``python -m fedlora.deploy.gateway``.

    Parameters
    ----------
    argv : list[str] | None
        Command-line arguments (``sys.argv[1:]`` if None).

    Returns
    -------
    int
        nginx's exit code, 0 after ``--write-only``, 1 on a reported error.
    """
    prog = "python -m fedlora.deploy.gateway"
    parser = argparse.ArgumentParser(prog=prog, description=gateway_main.__doc__)
    parser.add_argument("--pki", type=Path, required=True, help="directory of ca.crt, server.crt, server.key")
    parser.add_argument("--listen", required=True, help="public HOST:PORT that SuperNodes dial")
    parser.add_argument("--superlink", required=True, help="the SuperLink's loopback HOST:PORT")
    parser.add_argument("--dir", type=Path, required=True, help="where nginx.conf, logs and the pid file go")
    parser.add_argument("--max-body", default=DEFAULT_MAX_BODY, help="largest request body (nginx size)")
    parser.add_argument("--write-only", action="store_true", help="write and check nginx.conf, do not run it")
    args = parser.parse_args(argv)
    try:
        listen = _split(args.listen, "--listen")
        upstream = _split(args.superlink, "--superlink")
        spec = GatewaySpec(*listen, *upstream, pki=PkiPaths.in_dir(args.pki), max_body=args.max_body)
        config = write_gateway_config(spec, args.dir)
        check_config(config)
    except (OSError, ValueError) as err:
        print(f"fedlora gateway: error: {err}", file=sys.stderr)
        return 1
    print(f"gateway configuration: {config}; SuperNodes dial {spec.address}", flush=True)
    if args.write_only:
        return 0
    return subprocess.call(gateway_command(config))


if __name__ == "__main__":
    sys.exit(gateway_main())
