"""Array records of the wire protocol: packing adapter tensors, and unpacking them without trust.

Part of :mod:`fedlora.protocol` (which re-exports every name here): an ``ArrayRecord`` holds
``.npy``-serialised arrays whose headers a sender controls, so every size, shape and dtype is
checked against what the record must hold before a single array is allocated.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedlora.adapters import AdapterState

WIRE_DTYPE = np.dtype("<f4")  # every adapter tensor and delta travels as little-endian float32
_NPY_HEADER_MAX = 4096  # bytes of .npy header we accept per array


class ProtocolError(ValueError):
    """A message does not follow the protocol; the reply is rejected (never a crash)."""


def encode_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack adapter tensors into an ArrayRecord as float32 on CPU, keeping PEFT names."""
    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def record_bytes(record: ArrayRecord | None) -> int:
    """Return the serialised size of ``record`` in bytes (0 for None)."""
    return 0 if record is None else int(sum(len(a.data) for a in record.values()))


def _read_npy(name: str, array: Any, want_shape: tuple[int, ...] | None) -> torch.Tensor:
    """Decode one Flower ``Array`` after checking its header against what it must be.

    The header's shape and dtype are read first and the byte count compared with the data
    actually present, so a header claiming a gigantic shape never reaches an allocation.
    """
    data = getattr(array, "data", None)
    if getattr(array, "stype", None) != "numpy.ndarray" or not isinstance(data, bytes):
        raise ProtocolError(f"array {name!r} is not a serialised numpy array")
    buf = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buf)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = reader(buf, max_header_size=_NPY_HEADER_MAX)
    except (ValueError, TypeError, SyntaxError, EOFError) as err:
        raise ProtocolError(f"array {name!r} has a malformed header: {err}") from None
    if dtype != WIRE_DTYPE:
        raise ProtocolError(
            f"array {name!r} has dtype {dtype}, expected {WIRE_DTYPE} "
            "(a delta has exactly the adapter's dtype)"
        )
    if want_shape is not None and tuple(shape) != tuple(want_shape):
        raise ProtocolError(f"array {name!r} has shape {tuple(shape)}, expected {tuple(want_shape)}")
    count = math.prod(shape)
    offset = buf.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ProtocolError(
            f"array {name!r} claims shape {tuple(shape)} ({count * dtype.itemsize} bytes) "
            f"but carries {len(data) - offset} bytes"
        )
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return torch.from_numpy(flat.reshape(shape, order="F" if fortran else "C").copy())


def decode_arrays(
    record: object,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    max_bytes: int,
    what: str = "record",
) -> AdapterState:
    """Unpack an ArrayRecord into fresh tensors, refusing oversized or mismatching records.

    Parameters
    ----------
    record
        The received ArrayRecord.
    reference
        When given, the record must hold exactly these names with these shapes (an update
        that omits a tensor is refused, not read as a zero update).
    max_bytes
        Largest total payload accepted, checked before any array is deserialised.
    what
        How the record is named in error messages.
    """
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{what} is a {type(record).__name__}, not an ArrayRecord")
    sizes = [len(getattr(a, "data", b"")) for a in record.values()]
    if sum(sizes) > max_bytes:
        raise ProtocolError(f"{what} is {sum(sizes)} bytes, above the cap of {max_bytes} bytes")
    if reference is not None:
        missing = sorted(set(reference) - set(record))
        extra = sorted(set(record) - set(reference))
        if missing:
            raise ProtocolError(f"{what} omits {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if extra:
            raise ProtocolError(f"{what} has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
    out: AdapterState = {}
    for name, array in record.items():
        want = tuple(reference[name].shape) if reference is not None else None
        out[name] = _read_npy(name, array, want)
    return out


def size_cap(reference: Mapping[str, torch.Tensor], factor: float) -> int:
    """Return the byte cap for a record expected to hold ``reference``'s tensors as float32."""
    exact = sum(t.numel() * WIRE_DTYPE.itemsize for t in reference.values())
    return int(exact * max(factor, 1.0)) + _NPY_HEADER_MAX * max(len(reference), 1)
