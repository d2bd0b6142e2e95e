"""Certificates and node keys: chains verify, SANs are right, Flower's loaders accept the keys."""

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.verification import PolicyBuilder, Store

from fedlora.deploy import certs, nodekeys
from fedlora.deploy.cli import certs_main


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> certs.PkiPaths:
    out = tmp_path_factory.mktemp("pki")
    return certs.init_pki(out, ["localhost", "127.0.0.1", "::1", "link.example.org", "10.1.2.3"])


def test_server_chain_verifies_for_every_san(pki):
    ca, server = _load(pki.ca_cert), _load(pki.server_cert)
    store = Store([ca])
    for name in ("localhost", "link.example.org"):
        verifier = PolicyBuilder().store(store).build_server_verifier(x509.DNSName(name))
        chain = verifier.verify(server, [])
        assert chain[-1] == ca
    for ip in ("127.0.0.1", "::1", "10.1.2.3"):
        verifier = (
            PolicyBuilder().store(store).build_server_verifier(x509.IPAddress(ipaddress.ip_address(ip)))
        )
        verifier.verify(server, [])


def test_name_not_in_sans_is_rejected(pki):
    verifier = (
        PolicyBuilder()
        .store(Store([_load(pki.ca_cert)]))
        .build_server_verifier(x509.DNSName("evil.example.org"))
    )
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(_load(pki.server_cert), [])


def test_foreign_ca_does_not_verify(pki, tmp_path):
    other = certs.init_pki(tmp_path / "other")
    verifier = (
        PolicyBuilder().store(Store([_load(other.ca_cert)])).build_server_verifier(x509.DNSName("localhost"))
    )
    with pytest.raises(x509.verification.VerificationError):
        verifier.verify(_load(pki.server_cert), [])


def test_sans_and_extensions(pki):
    server = _load(pki.server_cert)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "link.example.org"]
    assert {str(ip) for ip in san.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ca = _load(pki.ca_cert)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_default_sans():
    ca_key, ca_cert = certs.create_ca()
    _, cert = certs.create_server_certificate(ca_key, ca_cert)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]


def test_real_tls_handshake_with_python_ssl(pki):
    """The files work as a TLS server/client pair (uvicorn and httpx use Python's ssl)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.server_cert, pki.server_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(5))

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        with socket.create_connection(("127.0.0.1", port)) as raw:
            with client_ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(b"hello")
                assert tls.recv(5) == b"hello"
        thread.join(5)


def test_private_keys_are_0600_and_public_files_readable(pki):
    assert _mode(pki.ca_key) == 0o600
    assert _mode(pki.server_key) == 0o600
    assert _mode(pki.ca_cert) == 0o644
    assert _mode(pki.server_cert) == 0o644


def test_node_keys_load_with_flower_loaders(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes, uses_nist_ec_curve

    paths = nodekeys.write_node_keys(tmp_path, "hospital-a")
    assert _mode(paths.private_key) == 0o600
    # flower-supernode --auth-supernode-private-key reads it like this:
    private = serialization.load_ssh_private_key(paths.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey)
    assert isinstance(private.curve, ec.SECP384R1)
    # flwr supernode register reads the public key like this:
    registered = try_load_public_key(paths.public_key)
    assert registered == public_key_to_bytes(private.public_key())
    public = serialization.load_ssh_public_key(paths.public_key.read_bytes())
    assert uses_nist_ec_curve(public)
    assert paths.public_key.read_text().split()[-1] == "hospital-a"


def test_refuses_to_overwrite_and_force_overwrites(tmp_path):
    first = nodekeys.write_node_keys(tmp_path, "n1")
    before = first.private_key.read_bytes()
    with pytest.raises(FileExistsError, match="--force"):
        nodekeys.write_node_keys(tmp_path, "n1")
    nodekeys.write_node_keys(tmp_path, "n1", force=True)
    assert first.private_key.read_bytes() != before
    assert _mode(first.private_key) == 0o600


@pytest.mark.parametrize("bad", ["", "https://host", "host:8000", "a b", "-bad-.org"])
def test_invalid_sans_are_named(bad):
    with pytest.raises(ValueError, match="SAN"):
        certs.parse_san(bad)


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 65, "-n"])
def test_invalid_node_names(tmp_path, bad):
    with pytest.raises(ValueError, match="node name"):
        nodekeys.write_node_keys(tmp_path, bad)


def test_cli_init_server_node(tmp_path, capsys):
    out = tmp_path / "pki"
    assert certs_main(["init", "--out", str(out), "--san", "10.0.0.7"]) == 0
    san = _load(out / "server.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    # a second init refuses, with a message naming the fix
    assert certs_main(["init", "--out", str(out)]) == 1
    assert "--force" in capsys.readouterr().err
    # re-issue the server certificate with new SANs from the same CA
    ca_before = (out / "ca.crt").read_bytes()
    assert certs_main(["server", "--out", str(out), "--san", "link.lan"]) == 0
    assert (out / "ca.crt").read_bytes() == ca_before
    verifier = (
        PolicyBuilder().store(Store([_load(out / "ca.crt")])).build_server_verifier(x509.DNSName("link.lan"))
    )
    verifier.verify(_load(out / "server.crt"), [])
    assert certs_main(["node", "--out", str(out / "nodes"), "--name", "pi-1"]) == 0
    assert (out / "nodes" / "pi-1.key").is_file() and (out / "nodes" / "pi-1.pub").is_file()


def test_cli_server_without_ca_explains(tmp_path, capsys):
    assert certs_main(["server", "--out", str(tmp_path)]) == 1
    assert "fedlora certs init" in capsys.readouterr().err
