"""Helpers for tests that forge packed array records (:mod:`fedlora.protocol_arrays`).

An honest record is read with :func:`unpacked` and rebuilt with
:func:`fedlora.protocol.encode_arrays`; :func:`forged` builds a record from any manifest and
any values array, bypassing every check an honest sender would pass.
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedlora.protocol import decode_arrays
from fedlora.protocol_arrays import MANIFEST, VALUES


def unpacked(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Return the tensors of an honest packed record, in manifest order."""
    return decode_arrays(record, max_bytes=2**40)


def manifest_array(manifest: object) -> Array:
    """Return the manifest array for ``manifest``: raw bytes as given, anything else as compact JSON."""
    raw = manifest if isinstance(manifest, bytes) else json.dumps(manifest, separators=(",", ":")).encode()
    return Array(np.frombuffer(raw, dtype=np.uint8))


def header_only(dtype: str, shape: tuple[int, ...], payload: bytes = b"") -> Array:
    """Return an ``Array`` whose ``.npy`` header claims ``dtype``/``shape`` but carries ``payload``."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": dtype, "fortran_order": False, "shape": shape})
    return Array(dtype="float32", shape=shape, stype="numpy.ndarray", data=buf.getvalue() + payload)


def forged(manifest: object, values: np.ndarray | Array) -> ArrayRecord:
    """Return a packed-looking record with this manifest and these values, unchecked."""
    return ArrayRecord(
        {MANIFEST: manifest_array(manifest), VALUES: values if isinstance(values, Array) else Array(values)}
    )
