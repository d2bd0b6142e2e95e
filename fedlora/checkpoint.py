"""Atomic, verifiable checkpoints of server state.

A checkpoint is one file holding a nested ``dict`` whose leaves are tensors or
JSON-like values (``str``, ``int``, ``float``, ``bool``, ``None``) inside ``dict``
(string keys), ``list`` and ``tuple`` containers: the global adapter, the round
number, strategy state, privacy ledgers, metrics so far.

Crash safety (a crash loses at most the checkpoint being written):

1. the state is serialised with ``torch.save`` into memory and written, behind a
   header with its length and SHA-256, to a temporary file in the target directory,
   then ``fsync``-ed;
2. the current checkpoint is hard-linked to ``<name>.prev`` (so ``<name>`` never
   disappears), then the temporary file atomically replaces ``<name>`` via
   ``os.replace`` and the directory is ``fsync``-ed (:func:`fedlora.atomic.atomic_write`;
   files are owner-only, 0600).

``load_checkpoint`` verifies length and digest before unpickling with
``torch.load(weights_only=True)`` (no arbitrary code runs on load) and falls back to
``<name>.prev`` with a ``RuntimeWarning`` when the latest file is missing, truncated or
corrupt. One writer per checkpoint path is assumed.

File layout: ``MAGIC`` (16 bytes) | payload length (8 bytes, big-endian) |
SHA-256 of the payload (32 bytes) | payload (a ``torch.save`` zip archive).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fedlora.atomic import TMP_MARK, atomic_write, temp_path

MAGIC = b"FEDLORA-CKPT-v1\n"
_HEADER_LEN = len(MAGIC) + 8 + 32
_TMP_MARK = TMP_MARK
PREV_SUFFIX = ".prev"

logger = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint file is missing, truncated, corrupt or not a fedlora checkpoint."""


def prev_path(path: str | os.PathLike[str]) -> Path:
    """Return the path of the previous checkpoint kept beside ``path``."""
    p = Path(path)
    return p.with_name(p.name + PREV_SUFFIX)


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically write ``state`` to ``path``, keeping the old file as ``<path>.prev``.

    Parameters
    ----------
    path : str or PathLike
        Checkpoint file. Its directory is created if missing.
    state : Mapping[str, Any]
        Nested dict of tensors and JSON-like values. Tensors are saved as they are
        (detach and move them to CPU first if they live on an accelerator).

    Returns
    -------
    Path
        The checkpoint path.

    Raises
    ------
    TypeError
        If a leaf or key of ``state`` has an unsupported type; the message names its
        location, e.g. ``state['strategy']['momentum']``.
    """
    target = Path(path)
    _check_state(state, "state")
    buffer = io.BytesIO()
    torch.save(dict(state), buffer)
    payload = buffer.getvalue()
    header = MAGIC + len(payload).to_bytes(8, "big") + hashlib.sha256(payload).digest()

    _remove_stale_temps(target)
    atomic_write(target, header + payload, before_replace=_keep_previous)
    return target


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the latest valid checkpoint at ``path``, else ``<path>.prev``.

    Parameters
    ----------
    path : str or PathLike
        Checkpoint file written by ``save_checkpoint``.
    map_location : str or torch.device
        Where tensors are loaded (default CPU).

    Returns
    -------
    dict[str, Any]
        The saved state.

    Raises
    ------
    FileNotFoundError
        If neither ``path`` nor ``<path>.prev`` exists.
    CheckpointError
        If no existing file is a valid checkpoint; the message lists why each failed.

    Warns
    -----
    RuntimeWarning
        When the latest file is unusable and the previous checkpoint is returned.
    """
    latest, previous = Path(path), prev_path(path)
    if not latest.exists() and not previous.exists():
        raise FileNotFoundError(f"No checkpoint at {latest} (nor {previous}); start a fresh run instead.")
    try:
        return read_checkpoint(latest, map_location)
    except (CheckpointError, FileNotFoundError) as err:
        latest_error = err
    try:
        state = read_checkpoint(previous, map_location)
    except (CheckpointError, FileNotFoundError) as err:
        raise CheckpointError(
            f"No usable checkpoint: latest {latest}: {latest_error}; previous {previous}: {err}. "
            "Restart the run from scratch or restore a backup."
        ) from err
    message = (
        f"Checkpoint {latest} is unusable ({latest_error}); resuming from previous checkpoint {previous}."
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=2)
    return state


def read_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read and verify exactly one checkpoint file (no fallback).

    Parameters
    ----------
    path : str or PathLike
        File to read.
    map_location : str or torch.device
        Where tensors are loaded.

    Returns
    -------
    dict[str, Any]
        The saved state.

    Raises
    ------
    FileNotFoundError
        If the file does not exist.
    CheckpointError
        If the file is not a fedlora checkpoint, is truncated or fails its digest.
    """
    data = Path(path).read_bytes()
    if len(data) < _HEADER_LEN or not data.startswith(MAGIC):
        if data.startswith(MAGIC[: min(len(data), len(MAGIC))]) and len(data) < _HEADER_LEN:
            raise CheckpointError(f"{path} is truncated ({len(data)} bytes, header needs {_HEADER_LEN})")
        raise CheckpointError(f"{path} is not a fedlora checkpoint (bad header)")
    length = int.from_bytes(data[len(MAGIC) : len(MAGIC) + 8], "big")
    digest = data[len(MAGIC) + 8 : _HEADER_LEN]
    payload = data[_HEADER_LEN:]
    if len(payload) != length:
        raise CheckpointError(f"{path} is truncated or padded: payload has {len(payload)} of {length} bytes")
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"{path} is corrupt: SHA-256 of the payload does not match its header")
    try:
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as err:  # a verified payload that fails to unpickle: wrong torch or tampering
        raise CheckpointError(f"{path} could not be deserialised: {err}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds {type(state).__name__}, expected a dict")
    return state


# --------------------------------------------------------------------------- helpers

_SCALARS = (str, int, float, bool, type(None))


def _check_state(value: Any, where: str) -> None:
    """Reject values that ``torch.load(weights_only=True)`` would refuse, naming where they are."""
    if isinstance(value, (torch.Tensor, *_SCALARS)):
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where} has a non-string key {key!r}; use string keys.")
            _check_state(item, f"{where}[{key!r}]")
        return
    if isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _check_state(item, f"{where}[{index}]")
        return
    hint = " (convert with torch.from_numpy / .tolist())" if type(value).__module__ == "numpy" else ""
    raise TypeError(
        f"{where} is a {type(value).__module__}.{type(value).__qualname__}; checkpoints hold tensors, "
        f"str, int, float, bool, None, and dict/list/tuple of those{hint}."
    )


def _keep_previous(target: Path) -> None:
    """Make ``<target>.prev`` the current file without ever removing ``target``."""
    previous = prev_path(target)
    link_tmp = temp_path(previous)
    try:
        os.link(target, link_tmp)
    except OSError:  # file systems without hard links: copy instead (still atomic via replace)
        link_tmp.write_bytes(target.read_bytes())
    os.replace(link_tmp, previous)


def _remove_stale_temps(target: Path) -> None:
    """Delete temp files that a crashed writer of this checkpoint left behind."""
    for pattern in (f".{target.name}{_TMP_MARK}*", f".{target.name}{PREV_SUFFIX}{_TMP_MARK}*"):
        for stale in target.parent.glob(pattern):
            stale.unlink(missing_ok=True)
