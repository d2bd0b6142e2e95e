"""SuperNode authentication keys (ECDSA SECP384R1, OpenSSH format) for a Flower deployment.

Flower 1.42 reads the private key with ``load_ssh_private_key`` (``flower-supernode
--auth-supernode-private-key``) and the public key with ``load_ssh_public_key``
(``flwr supernode register``), and accepts only NIST curves; the keys written here are the
same as ``ssh-keygen -t ecdsa -b 384``. Private keys get mode 0600 and are never
overwritten unless asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from fedlora.deploy.certs import generate_private_key, refuse_existing, write_file

_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class NodeKeyPaths:
    """Where ``write_node_keys`` put one SuperNode's key pair."""

    private_key: Path
    public_key: Path


def node_key_pair(comment: str = "") -> tuple[bytes, bytes]:
    """Create a SuperNode authentication key pair in OpenSSH format.

    Parameters
    ----------
    comment : str
        Appended to the public key line (``ecdsa-sha2-nistp384 AAAA... comment``),
        conventionally the node name.

    Returns
    -------
    tuple[bytes, bytes]
        ``(private_key, public_key)``: an unencrypted ``OPENSSH PRIVATE KEY`` block for
        ``flower-supernode --auth-supernode-private-key`` and a one-line public key for
        ``flwr supernode register``.
    """
    key = generate_private_key()
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    if comment:
        public += b" " + comment.encode("utf-8")
    return private, public + b"\n"


def write_node_keys(out_dir: Path, name: str, force: bool = False) -> NodeKeyPaths:
    """Write one SuperNode's key pair as ``<name>.key`` (0600) and ``<name>.pub``.

    Parameters
    ----------
    out_dir : Path
        Target directory.
    name : str
        Node name: letters, digits, ``_``, ``.`` and ``-``, at most 64 characters.
    force : bool
        Overwrite existing files.

    Returns
    -------
    NodeKeyPaths
        The written files.

    Raises
    ------
    ValueError
        If ``name`` is not a safe file name.
    """
    check_node_name(name)
    out = Path(out_dir)
    paths = NodeKeyPaths(private_key=out / f"{name}.key", public_key=out / f"{name}.pub")
    if not force:
        refuse_existing([paths.private_key, paths.public_key])
    private, public = node_key_pair(comment=name)
    write_file(paths.private_key, private, private=True, force=force)
    write_file(paths.public_key, public, private=False, force=force)
    return paths


def check_node_name(name: str) -> str:
    """Return ``name`` if it is a safe node/file name, else raise ``ValueError``."""
    if not _NODE_NAME.match(name):
        raise ValueError(
            f"Invalid node name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit (e.g. 'hospital-a')."
        )
    return name
