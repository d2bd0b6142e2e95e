"""Array records of the wire protocol: adapter tensors packed into one buffer, unpacked without trust.

Part of :mod:`fedlora.protocol` (which re-exports every name here).

**Packed form.** Flower 1.42 moves a message as a tree of objects, each pulled or pushed with
one request (``flwr/supercore/inflatable``): the ``Message``, its ``RecordDict``, every record,
every ``Array`` of an ``ArrayRecord`` and every distinct chunk of at most 5 MiB of an array's
bytes (``ArrayChunk``, ``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``). One ``Array`` per adapter tensor
made a message of hundreds of objects for an LLM adapter, each a round trip, two at a time, and
a 1 s back-off whenever one was asked for before the sender had pushed it. So an adapter
travels as an ``ArrayRecord`` of exactly two arrays, whatever the model:

``"manifest"``
    UTF-8 JSON, ``.npy`` of ``uint8``: ``[[name, [d0, d1, ...], offset], ...]``, the tensors in
    buffer order, ``offset`` counted in elements.
``"values"``
    ``.npy`` of one flat little-endian float32 array: every tensor, C order, back to back.

The manifest travels inside the record it describes, so a record cannot be separated from
its layout or paired with another's. A record is a handful of objects (record, two arrays,
one chunk each, one more per further 5 MiB of values).

**Without trust.** :func:`decode_arrays` checks, before anything is allocated or split: the
record's keys; the total bytes against the cap; the manifest's header, size, JSON and every
entry (string names, no duplicates, integer non-negative dims, offsets that tile the buffer
with no overlap and no gap); the names and shapes against the expected tensors when given;
and the values' header (dtype ``<f4``, shape equal to the manifest's total, byte count equal
to what the header claims). Only then are the tensors copied out.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedlora.adapters import AdapterState

WIRE_DTYPE = np.dtype("<f4")  # every adapter tensor and delta travels as little-endian float32
MANIFEST_DTYPE = np.dtype("|u1")  # the manifest's UTF-8 bytes
MANIFEST, VALUES = "manifest", "values"  # the two arrays of a packed record
_NPY_HEADER_MAX = 4096  # bytes of .npy header we accept per array
MAX_MANIFEST_BYTES = 16 * 2**20  # ~100k tensors; a 70B model's LoRA on every linear has < 2k
MAX_NAME_CHARS = 512
MAX_DIMS = 8
MAX_DIM = 2**40  # no single dimension of an adapter tensor comes near this


class ProtocolError(ValueError):
    """A message does not follow the protocol; the reply is rejected (never a crash)."""


# --------------------------------------------------------------------------- packing


def manifest_entries(state: Mapping[str, torch.Tensor]) -> list[list[Any]]:
    """Return the manifest of ``state`` packed in its iteration order: ``[[name, shape, offset], ...]``.

    ``manifest_entries({"a": zeros(2, 3), "b": zeros(4)})`` is ``[["a", [2, 3], 0], ["b", [4], 6]]``.
    """
    out, offset = [], 0
    for name, t in state.items():
        out.append([name, list(t.shape), offset])
        offset += t.numel()
    return out


def manifest_text(state: Mapping[str, torch.Tensor]) -> bytes:
    """Return the manifest of ``state`` as it travels: compact UTF-8 JSON."""
    return json.dumps(manifest_entries(state), separators=(",", ":")).encode()


def encode_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack adapter tensors into one float32 buffer plus its manifest, keeping PEFT names."""
    flat = [v.detach().to("cpu", torch.float32).reshape(-1) for v in state.values()]
    values = torch.cat(flat) if flat else torch.zeros(0)
    manifest = np.frombuffer(manifest_text(state), dtype=MANIFEST_DTYPE)
    return ArrayRecord(
        {MANIFEST: Array(manifest), VALUES: Array(values.numpy().astype(WIRE_DTYPE, copy=False))}
    )


def record_bytes(record: ArrayRecord | None) -> int:
    """Return the serialised size of ``record``'s arrays in bytes (0 for None).

    For a packed record: the values, the manifest and the two ``.npy`` headers.
    """
    return 0 if record is None else int(sum(len(a.data) for a in record.values()))


def manifest_cap(reference: Mapping[str, torch.Tensor] | None) -> int:
    """Return the largest manifest accepted: about twice the expected one, at most :data:`MAX_MANIFEST_BYTES`.

    A fixed 16 MiB cap let any reply cost the server 2.5-3.5 s of CPU parsing a manifest for
    an adapter whose own manifest is a few KB; with a reference the cap follows its size.
    """
    if reference is None:
        return MAX_MANIFEST_BYTES
    return min(MAX_MANIFEST_BYTES, 2 * len(manifest_text(reference)) + 4096)


def size_cap(reference: Mapping[str, torch.Tensor], factor: float) -> int:
    """Return the byte cap for a packed record expected to hold ``reference``'s tensors as float32."""
    exact = sum(t.numel() * WIRE_DTYPE.itemsize for t in reference.values()) + len(manifest_text(reference))
    return int(exact * max(factor, 1.0)) + 2 * _NPY_HEADER_MAX


# --------------------------------------------------------------------------- unpacking


def _npy_header(name: str, array: Any, dtype: np.dtype) -> tuple[bytes, tuple[int, ...], int]:
    """Return ``(data, shape, offset)`` of a serialised 1-D array after checking its header.

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
        shape, _fortran, got = reader(buf, max_header_size=_NPY_HEADER_MAX)
    except (ValueError, TypeError, SyntaxError, EOFError) as err:
        raise ProtocolError(f"array {name!r} has a malformed header: {err}") from None
    if got != dtype:
        raise ProtocolError(f"array {name!r} has dtype {got}, expected {dtype}")
    if len(shape) != 1:
        raise ProtocolError(f"array {name!r} has shape {tuple(shape)}, expected a flat (1-D) array")
    offset = buf.tell()
    if len(data) - offset != shape[0] * dtype.itemsize:
        raise ProtocolError(
            f"array {name!r} claims shape {tuple(shape)} ({shape[0] * dtype.itemsize} bytes) "
            f"but carries {len(data) - offset} bytes"
        )
    return data, tuple(shape), offset


def _dims(name: str, shape: object) -> tuple[int, ...]:
    """Return a manifest entry's shape after checking each dimension is a bounded non-negative int."""
    if not isinstance(shape, list) or len(shape) > MAX_DIMS:
        raise ProtocolError(f"manifest entry {name!r}: shape must be a list of at most {MAX_DIMS} ints")
    for d in shape:
        if isinstance(d, bool) or not isinstance(d, int) or not 0 <= d <= MAX_DIM:
            raise ProtocolError(f"manifest entry {name!r}: dimension {d!r} is not an integer in 0..{MAX_DIM}")
    return tuple(shape)


def parse_manifest(text: bytes) -> list[tuple[str, tuple[int, ...], int, int]]:
    """Return ``[(name, shape, offset, count), ...]`` of a received manifest, refusing any malformed one.

    Entries must tile the buffer in order: each offset equals the previous offset plus the
    previous tensor's element count (a smaller one overlaps, a larger one leaves a gap).

    Raises
    ------
    ProtocolError
        Not UTF-8 JSON; not a list of ``[name, shape, offset]``; a name that is not a short
        non-empty string or appears twice; a dimension that is not a non-negative integer
        (bools, floats and strings refused); an offset that overlaps or leaves a gap.
    """
    try:
        entries = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ProtocolError(f"manifest is not UTF-8 JSON: {err}") from None
    if not isinstance(entries, list):
        raise ProtocolError(f"manifest must be a JSON list, got {type(entries).__name__}")
    out, seen, expected_offset = [], set(), 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, list) or len(entry) != 3:
            raise ProtocolError(f"manifest entry {i} is not [name, shape, offset]")
        name, shape, offset = entry
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
            raise ProtocolError(f"manifest entry {i}: name must be a string of 1..{MAX_NAME_CHARS} chars")
        if name in seen:
            raise ProtocolError(f"manifest names tensor {name!r} twice")
        seen.add(name)
        dims = _dims(name, shape)
        if isinstance(offset, bool) or not isinstance(offset, int):
            raise ProtocolError(f"manifest entry {name!r}: offset {offset!r} is not an integer")
        if offset < expected_offset:
            raise ProtocolError(
                f"manifest entry {name!r} at offset {offset} overlaps the previous tensor "
                f"(which ends at {expected_offset})"
            )
        if offset > expected_offset:
            raise ProtocolError(
                f"manifest entry {name!r} at offset {offset} leaves a gap after {expected_offset}"
            )
        count = math.prod(dims)
        out.append((name, dims, offset, count))
        expected_offset = offset + count
    return out


def decode_arrays(
    record: object,
    reference: Mapping[str, torch.Tensor] | None = None,
    *,
    max_bytes: int,
    what: str = "record",
) -> AdapterState:
    """Unpack a packed ArrayRecord into fresh tensors, refusing oversized or mismatching records.

    Parameters
    ----------
    record
        The received ArrayRecord (:func:`encode_arrays`' form).
    reference
        When given, the record must hold exactly these names with these shapes (an update
        that omits a tensor is refused, not read as a zero update).
    max_bytes
        Largest total payload accepted (values, manifest and headers), checked before any
        array is deserialised.
    what
        How the record is named in error messages.
    """
    if not isinstance(record, ArrayRecord):
        raise ProtocolError(f"{what} is a {type(record).__name__}, not an ArrayRecord")
    if set(record) != {MANIFEST, VALUES}:
        raise ProtocolError(
            f"{what} must hold exactly the arrays {[MANIFEST, VALUES]} (packed form), "
            f"got {sorted(record)[:4]}"
        )
    total = sum(len(getattr(a, "data", b"")) for a in record.values())
    if total > max_bytes:
        raise ProtocolError(f"{what} is {total} bytes, above the cap of {max_bytes} bytes")
    mdata, (mlen,), moff = _npy_header(f"{what} {MANIFEST}", record[MANIFEST], MANIFEST_DTYPE)
    cap = manifest_cap(reference)
    if mlen > cap:
        raise ProtocolError(f"{what} manifest is {mlen} bytes, above {cap}")
    entries = parse_manifest(mdata[moff:])
    count = entries[-1][2] + entries[-1][3] if entries else 0
    if reference is not None:
        names = {e[0] for e in entries}
        missing = [k for k in reference if k not in names]
        extra = [e[0] for e in entries if e[0] not in reference]
        if missing:
            raise ProtocolError(f"{what} omits {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if extra:
            raise ProtocolError(f"{what} has {len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
        for name, dims, _, _ in entries:
            if dims != tuple(reference[name].shape):
                raise ProtocolError(
                    f"array {name!r} has shape {dims}, expected {tuple(reference[name].shape)}"
                )
    vdata, (vlen,), voff = _npy_header(f"{what} {VALUES}", record[VALUES], WIRE_DTYPE)
    if vlen != count:
        raise ProtocolError(
            f"{what} manifest describes {count} values but the buffer holds {vlen} "
            f"({vlen * WIRE_DTYPE.itemsize} bytes)"
        )
    flat = np.frombuffer(vdata, dtype=WIRE_DTYPE, count=vlen, offset=voff)
    return {
        name: torch.from_numpy(flat[off : off + n].reshape(dims).astype(np.float32))
        for name, dims, off, n in entries
    }
