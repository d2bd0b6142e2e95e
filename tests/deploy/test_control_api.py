"""Flower's Control API is out of the nodes' reach: the Fleet gateway on real processes.

Flower 1.42 serves Fleet, Control and Runtime on the SuperLink's one port and authenticates no
Control caller, so a party holding only ``ca.crt`` could register its own SuperNode key, list runs
and start runs (code on every node). With ``Fleet(gateway=True)`` the SuperLink listens on loopback
and an nginx gateway (:mod:`fedlora.deploy.gateway`) on the address nodes dial forwards only the
Fleet endpoints. Here one SuperLink (TLS + SuperNode authentication), the gateway and two
registered SuperNodes run as real processes; the attacker holds ``ca.crt`` and a registered node's
key and can reach what the nodes reach (the gateway's address). Against a plain ``Fleet`` (no
gateway) every attack below succeeds.
"""

from __future__ import annotations

import json
import socket
import ssl
from base64 import b64encode
from pathlib import Path

import psutil
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedlora.deploy import certs, gateway, nodekeys
from fedlora.deploy.fleet import Fleet, FleetError
from fedlora.deploy.flwr_cli import FlwrCli, write_connection
from tests.deploy.test_fleet_tls import write_probe_app

LIMIT = 600  # only stops a hung test; every wait ends on an event

try:
    gateway.find_nginx()
    HAVE_NGINX = True
except FileNotFoundError:
    HAVE_NGINX = False
needs_nginx = pytest.mark.skipif(not HAVE_NGINX, reason="nginx is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """SuperLink on loopback + gateway + two registered, online SuperNodes."""
    fleet = Fleet(tmp_path_factory.mktemp("gated"), gateway=True)
    try:
        fleet.start_superlink()
        fleet.add_nodes({f"node-{i}": {"partition-id": i, "num-partitions": 2} for i in range(2)})
        fleet.wait_for_nodes(timeout=LIMIT)
        yield fleet
    finally:
        fleet.stop()


@pytest.fixture(scope="module")
def outsider(fleet, tmp_path_factory) -> FlwrCli:
    """The flwr CLI of a party with ``ca.crt`` and the nodes' network view: the gateway's address."""
    home = tmp_path_factory.mktemp("outsider-home")
    write_connection(home, "outside", fleet.address, root_certificates=fleet.pki.ca_cert)
    return FlwrCli(env={**fleet.cli.env, "FLWR_HOME": str(home)}, cwd=home, connection="outside")


def _raw_post(fleet: Fleet, target: str, headers: dict[str, str] | None = None, method: str = "POST") -> int:
    """Send ``METHOD target`` byte for byte (no client-side path clean-up) over TLS; return the status."""
    context = ssl.create_default_context(cafile=str(fleet.pki.ca_cert))
    host, port = fleet.host, fleet.port
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/protobuf"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    request = "\r\n".join([*lines, "Content-Length: 0", "Connection: close", "", ""]).encode()
    with socket.create_connection((host, port), timeout=30) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.sendall(request)
            status_line = tls.makefile("rb").readline().decode()
    return int(status_line.split()[1])


def _node_headers(key_path: Path) -> dict[str, str]:
    """The signed identity headers a registered SuperNode sends with each Fleet request."""
    from flwr.supercore.date import now

    key = serialization.load_ssh_private_key(key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    stamp = now().isoformat()
    signature = key.sign(stamp.encode("ascii"), ec.ECDSA(hashes.SHA256()))
    return {
        "flwr-public-key": b64encode(public).decode(),
        "flwr-timestamp": stamp,
        "flwr-signature": b64encode(signature).decode(),
    }


@needs_nginx
def test_superlink_listens_on_loopback_only(fleet):
    listening = {
        c.laddr
        for c in psutil.Process(fleet.superlink.popen.pid).net_connections("inet")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening and {addr.ip for addr in listening} == {"127.0.0.1"}
    assert fleet.control_port in {addr.port for addr in listening}
    assert fleet.port not in {addr.port for addr in listening}  # nodes' port is the gateway's


@needs_nginx
def test_outsider_cannot_register_a_key(fleet, outsider, tmp_path):
    before = {n["node-id"] for n in fleet.list_nodes()}
    own = nodekeys.write_node_keys(tmp_path, "intruder")
    with pytest.raises(FleetError, match="403"):
        outsider.register_nodes({"intruder": own.public_key}, timeout=LIMIT)
    # nor through the Fleet API: a SuperNode with its own, unregistered key is refused
    rogue = fleet.add_node("intruder", {"partition-id": 0}, private_key=own.private_key, max_retries=0)
    assert rogue.process.wait(timeout=LIMIT) != 0
    assert "Failed to activate SuperNode" in rogue.process.log()
    assert {n["node-id"] for n in fleet.list_nodes()} == before


@needs_nginx
def test_outsider_cannot_list_or_start_runs(fleet, outsider, tmp_path):
    runs_before = fleet.flwr_json("ls", fleet.connection, "--format", "json")["runs"]
    with pytest.raises(FleetError, match="403"):
        outsider.json("ls", "outside", "--format", "json")
    with pytest.raises(FleetError, match="403"):
        outsider.json("supernode", "ls", "outside", "--format", "json")
    app = write_probe_app(tmp_path / "app")
    with pytest.raises(FleetError, match="403"):
        outsider.submit(app, f"out-file='{tmp_path / 'never.json'}'")
    assert fleet.flwr_json("ls", fleet.connection, "--format", "json")["runs"] == runs_before


@needs_nginx
@pytest.mark.parametrize(
    "target",
    [
        "/v1/control/list-runs",
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/runtime/get-nodes",  # the ServerApp's API
        "/v1/runtime/acquire-task",
        "/v1/fleet/../control/list-runs",
        "/v1/fleet/%2e%2e/control/list-runs",
        "/v1/fleet/..%2Fcontrol/list-runs",
        "/v1/fleet//../../v1/control/list-runs",
        "/v1/control/list-runs?/v1/fleet/get-run",
        "/v1/fleet/get-run/../../control/list-runs",
        "/docs",
    ],
)
def test_node_signed_requests_reach_no_other_api(fleet, target):
    node = fleet.nodes["node-0"]
    assert node.key_paths is not None
    assert _raw_post(fleet, target, _node_headers(node.key_paths.private_key)) == 403


@needs_nginx
def test_fleet_endpoints_pass_and_only_by_post(fleet):
    # reaches Flower (which then wants a protobuf body), not the gateway's refusal
    assert _raw_post(fleet, "/v1/fleet/get-run") not in (403, 404)
    assert _raw_post(fleet, "/v1/fleet/get-run", method="GET") == 403


@needs_nginx
def test_operator_still_runs_the_federation(fleet, tmp_path):
    out = tmp_path / "result.json"
    result = fleet.run_app(write_probe_app(tmp_path / "app"), {"num-server-rounds": 1, "out-file": str(out)})
    assert result.ok, f"{result.status}\n{result.logs[-3000:]}\n{fleet.log_tails()}"
    assert json.loads(out.read_text()) == {"rounds": 1, "final": [1.5] * 4}  # both nodes, via the gateway
    assert "POST /v1/fleet/push-messages" in (fleet.workdir / "gateway" / "access.log").read_text()


# ---------------------------------------------------------------------- configuration (no processes)


def test_superlink_behind_the_gateway_must_be_loopback(tmp_path):
    pki = certs.init_pki(tmp_path)
    with pytest.raises(ValueError, match=r"--host 127\.0\.0\.1"):
        gateway.GatewaySpec("0.0.0.0", 9092, "0.0.0.0", 9093, pki=pki)
    with pytest.raises(ValueError, match="different ports"):
        gateway.GatewaySpec("127.0.0.1", 9092, "127.0.0.1", 9092, pki=pki)


def test_config_forwards_exactly_the_fleet_endpoints(tmp_path):
    pki = certs.init_pki(tmp_path)
    spec = gateway.GatewaySpec("0.0.0.0", 9092, "127.0.0.1", 9093, pki=pki)
    locations = [line.strip() for line in gateway.render_nginx_config(spec, tmp_path).splitlines()]
    locations = [line for line in locations if line.startswith("location")]
    fleet_only = "location ~ ^/v1/fleet/(" + "|".join(gateway.FLEET_ENDPOINTS) + ")$ {"
    assert locations == [fleet_only, "location / {"]
    text = gateway.render_nginx_config(spec, tmp_path)
    assert "proxy_ssl_verify on;" in text and "return 403;" in text


def test_server_certificate_without_localhost_is_refused(tmp_path):
    pki = certs.init_pki(tmp_path, ["superlink.example.org", "127.0.0.1"])
    spec = gateway.GatewaySpec("0.0.0.0", 9092, "127.0.0.1", 9093, pki=pki)
    with pytest.raises(ValueError, match="--san localhost"):
        gateway.write_gateway_config(spec, tmp_path / "gw")


@needs_nginx
def test_gateway_command_writes_a_checked_config(tmp_path, capsys):
    certs.init_pki(tmp_path / "pki")
    argv = ["--pki", str(tmp_path / "pki"), "--listen", "0.0.0.0:9092", "--dir", str(tmp_path / "gw")]
    assert gateway.gateway_main([*argv, "--superlink", "127.0.0.1:9093", "--write-only"]) == 0
    assert "SuperNodes dial 0.0.0.0:9092" in capsys.readouterr().out
    assert "server 127.0.0.1:9093;" in (tmp_path / "gw" / "nginx.conf").read_text()
    assert gateway.gateway_main([*argv, "--superlink", "10.0.0.5:9093", "--write-only"]) == 1
    assert "start flower-superlink with --host 127.0.0.1" in capsys.readouterr().err


def test_gateway_needs_tls(tmp_path):
    with pytest.raises(ValueError, match="TLS only"):
        Fleet(tmp_path, tls=False, node_auth=False, gateway=True)
