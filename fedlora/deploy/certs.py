"""TLS certificates for a Flower deployment (node keys: :mod:`fedlora.deploy.nodekeys`).

A deployment needs three kinds of key material:

* a private certificate authority (CA): ``ca.key`` + self-signed ``ca.crt``;
* a server certificate for the SuperLink signed by that CA, whose subject
  alternative names (SANs) cover every host name and IP address SuperNodes and
  operators use to reach it: ``server.key`` + ``server.crt``;
* one ECDSA key pair per SuperNode for node authentication. Flower 1.42 reads the
  private key with ``load_ssh_private_key`` (``flower-supernode
  --auth-supernode-private-key``) and the public key with ``load_ssh_public_key``
  (``flwr supernode register``), and accepts only NIST curves; keys here are
  SECP384R1 in OpenSSH format, the same as ``ssh-keygen -t ecdsa -b 384``.

Private keys are written with mode 0600 and never overwritten unless asked.
:func:`fedlora.deploy.cli.certs_main` implements ``fedlora certs init|server|node``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825  # the longest lifetime common TLS clients accept for leaf certs


@dataclass(frozen=True)
class PkiPaths:
    """Where ``init_pki`` / ``issue_server_files`` put the TLS files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, out_dir: Path) -> PkiPaths:
        """Return the conventional file names inside ``out_dir``."""
        return cls(
            ca_cert=out_dir / "ca.crt",
            ca_key=out_dir / "ca.key",
            server_cert=out_dir / "server.crt",
            server_key=out_dir / "server.key",
        )


# --------------------------------------------------------------------------- pure functions


def generate_private_key() -> ec.EllipticCurvePrivateKey:
    """Return a fresh ECDSA SECP384R1 private key."""
    return ec.generate_private_key(ec.SECP384R1())


def parse_san(value: str) -> x509.GeneralName:
    """Turn one SAN string into an ``IPAddress`` or ``DNSName`` entry.

    Parameters
    ----------
    value : str
        An IPv4/IPv6 address (``10.0.0.5``, ``::1``) or a DNS name (``link.example.org``).

    Returns
    -------
    x509.GeneralName
        The matching general name.

    Raises
    ------
    ValueError
        If the value is empty or neither an IP address nor a valid DNS name.
    """
    text = value.strip()
    if not text:
        raise ValueError("Empty SAN: pass a DNS name (e.g. 'localhost') or an IP address.")
    try:
        ip = ipaddress.ip_address(text.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(
                f"Invalid SAN {value!r}: {ip} is not the address of one host (a certificate for it would "
                "match any listener); give the SuperLink's own address, e.g. '192.168.1.10'."
            )
        return x509.IPAddress(ip)
    label = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    if not re.fullmatch(rf"(\*\.)?{label}(\.{label})*\.?", text) or len(text) > 253:
        raise ValueError(
            f"Invalid SAN {value!r}: expected an IP address or a DNS name made of letters, digits, "
            "'-' and '.' (no scheme, no port; '*' only as a whole leftmost label), "
            "e.g. 'superlink.example.org' or '192.168.1.10'."
        )
    if text.startswith("*.") and len(text.rstrip(".").split(".")) < 3:
        raise ValueError(
            f"Invalid SAN {value!r}: a wildcard needs at least two labels after it ('*.example.org'); "
            "'*' or '*.com' would make the certificate valid for hosts the federation does not run."
        )
    return x509.DNSName(text)


def create_ca(
    common_name: str = "fedlora deployment CA",
    days: int = CA_VALIDITY_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a certificate authority: a key and a self-signed CA certificate.

    Parameters
    ----------
    common_name : str
        Subject CN of the CA.
    days : int
        Validity in days from now.
    key : ec.EllipticCurvePrivateKey | None
        Use this key instead of generating one.

    Returns
    -------
    tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
        The CA key and certificate (path length 0: it signs only leaf certificates).
    """
    _check_days(days)
    key = key or generate_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def create_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: tuple[str, ...] | list[str] = DEFAULT_SANS,
    days: int = SERVER_VALIDITY_DAYS,
    key: ec.EllipticCurvePrivateKey | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Issue a TLS server certificate for the SuperLink, signed by the CA.

    Parameters
    ----------
    ca_key, ca_cert : ec.EllipticCurvePrivateKey, x509.Certificate
        The issuing CA.
    sans : sequence of str
        DNS names and IP addresses clients use to reach the SuperLink. The first one
        is also the subject CN.
    days : int
        Validity in days from now.
    key : ec.EllipticCurvePrivateKey | None
        Use this key instead of generating one.

    Returns
    -------
    tuple[ec.EllipticCurvePrivateKey, x509.Certificate]
        The server key and certificate.

    Raises
    ------
    ValueError
        If ``sans`` is empty or holds an invalid entry.
    """
    _check_days(days)
    names = _dedupe_sans(sans)
    key = key or generate_private_key()
    public = key.public_key()
    now = dt.datetime.now(dt.UTC)
    not_after = min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc)
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _cn(names[0]))]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def cert_to_pem(cert: x509.Certificate) -> bytes:
    """Serialise a certificate as PEM."""
    return cert.public_bytes(serialization.Encoding.PEM)


def key_to_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Serialise a private key as unencrypted PKCS#8 PEM (what TLS servers load)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


# --------------------------------------------------------------------------- file output


def write_file(path: Path, data: bytes, *, private: bool, force: bool = False) -> Path:
    """Write ``data`` to ``path``; private files get mode 0600 from the start.

    Parameters
    ----------
    path : Path
        Target file; its directory is created (mode 0700) if missing.
    data : bytes
        Content.
    private : bool
        Mode 0600 if true, else 0644.
    force : bool
        Overwrite an existing file.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    FileExistsError
        If the file exists and ``force`` is false.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = 0o600 if private else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (0 if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise FileExistsError(
            f"{path} already exists; refusing to overwrite key material. "
            "Choose another --out directory or pass --force."
        ) from None
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), mode)  # the umask may have narrowed it, or the file pre-existed
        handle.write(data)
    return path


def init_pki(
    out_dir: Path, sans: tuple[str, ...] | list[str] = DEFAULT_SANS, force: bool = False
) -> PkiPaths:
    """Create a CA and a SuperLink server certificate under ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Directory for ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``.
    sans : sequence of str
        SANs of the server certificate.
    force : bool
        Overwrite existing files.

    Returns
    -------
    PkiPaths
        The written files.
    """
    paths = PkiPaths.in_dir(Path(out_dir))
    if not force:
        refuse_existing([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key])
    ca_key, ca_cert = create_ca()
    write_file(paths.ca_key, key_to_pem(ca_key), private=True, force=force)
    write_file(paths.ca_cert, cert_to_pem(ca_cert), private=False, force=force)
    _write_server(paths, ca_key, ca_cert, sans, force)
    return paths


def issue_server_files(out_dir: Path, sans: tuple[str, ...] | list[str], force: bool = True) -> PkiPaths:
    """Re-issue ``server.crt``/``server.key`` with new SANs from the CA already in ``out_dir``.

    Parameters
    ----------
    out_dir : Path
        Directory holding ``ca.crt`` and ``ca.key`` from ``init_pki``.
    sans : sequence of str
        SANs of the new server certificate.
    force : bool
        Replace an existing server certificate (default true: that is the point).

    Returns
    -------
    PkiPaths
        The files.

    Raises
    ------
    FileNotFoundError
        If the CA files are missing.
    """
    paths = PkiPaths.in_dir(Path(out_dir))
    if not paths.ca_key.is_file() or not paths.ca_cert.is_file():
        raise FileNotFoundError(
            f"No CA in {out_dir} (need ca.crt and ca.key); run `fedlora certs init --out {out_dir}` first."
        )
    ca_key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(
            f"{paths.ca_key} is not an EC private key; recreate the CA with `fedlora certs init --force`."
        )
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    _write_server(paths, ca_key, ca_cert, sans, force)
    return paths


# --------------------------------------------------------------------------- helpers


def _write_server(
    paths: PkiPaths,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    sans: tuple[str, ...] | list[str],
    force: bool,
) -> None:
    key, cert = create_server_certificate(ca_key, ca_cert, sans)
    write_file(paths.server_key, key_to_pem(key), private=True, force=force)
    write_file(paths.server_cert, cert_to_pem(cert), private=False, force=force)


def _dedupe_sans(sans: tuple[str, ...] | list[str]) -> list[x509.GeneralName]:
    if isinstance(sans, str):
        raise ValueError(f"sans must be a list of names, got the string {sans!r}; wrap it in a list.")
    names: list[x509.GeneralName] = []
    for value in sans:
        name = parse_san(value)
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("A server certificate needs at least one SAN, e.g. --san localhost.")
    return names


def _cn(name: x509.GeneralName) -> str:
    return str(name.value)[:64]  # X.509 caps CN at 64 characters; the SAN carries the full name


def _check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"Certificate validity must be at least 1 day, got {days}.")


def refuse_existing(paths: list[Path]) -> None:
    """Raise ``FileExistsError`` naming every path in ``paths`` that exists."""
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise FileExistsError(
            f"Refusing to overwrite existing key material: {', '.join(existing)}. "
            "Choose another --out directory or pass --force."
        )


if __name__ == "__main__":
    import sys

    from fedlora.deploy.cli import certs_main

    sys.exit(certs_main())
