"""The packed array record: exact round trip, a few Flower objects at any size, forged layouts refused.

Adversary: whoever builds the record (a hostile client for an update, a hostile or buggy
server for an adapter). Every forged manifest or buffer must end in :class:`ProtocolError`
before anything the size of the claim is allocated.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.protocol import (
    ProtocolError,
    TrainReply,
    TrainRequest,
    decode_arrays,
    encode_arrays,
    manifest_text,
    record_bytes,
    size_cap,
)
from fedlora.protocol_arrays import MANIFEST, VALUES, manifest_entries, parse_manifest
from tests.adversary.packing import forged, header_only, manifest_array

A, B, H = "m.lora_A.weight", "m.lora_B.weight", "head.bias"
STATE = {A: torch.arange(6.0).reshape(2, 3), B: -torch.arange(8.0).reshape(4, 2), H: torch.tensor([0.5])}
VALS = np.concatenate([v.numpy().ravel() for v in STATE.values()]).astype("<f4")  # 15 values
GOOD = [[A, [2, 3], 0], [B, [4, 2], 6], [H, [1], 14]]


@pytest.fixture(autouse=True)
def _identity(task_identity):
    return task_identity


def decode(record, reference=STATE, max_bytes=10**6):
    return decode_arrays(record, reference, max_bytes=max_bytes, what="update")


# --------------------------------------------------------------------------- honest records


def test_manifest_by_hand():
    assert manifest_entries(STATE) == GOOD
    assert (
        manifest_text(STATE)
        == b'[["m.lora_A.weight",[2,3],0],["m.lora_B.weight",[4,2],6],["head.bias",[1],14]]'
    )
    assert parse_manifest(manifest_text(STATE)) == [
        (A, (2, 3), 0, 6),
        (B, (4, 2), 6, 8),
        (H, (1,), 14, 1),
    ]


def test_round_trip_is_exact_and_keeps_order_names_and_shapes():
    odd = {
        "s": torch.tensor(2.5),
        "e": torch.zeros(0, 3),
        **STATE,
        "h": torch.randn(3, 2, dtype=torch.float64),
    }
    back = decode_arrays(encode_arrays(odd), max_bytes=10**6)
    assert list(back) == list(odd)
    for k, v in odd.items():
        assert back[k].dtype == torch.float32 and back[k].shape == v.shape
        assert torch.equal(back[k], v.to(torch.float32))
    assert decode_arrays(encode_arrays({}), max_bytes=1000) == {}


def test_record_is_two_arrays_and_its_bytes_are_values_manifest_and_two_headers():
    record = encode_arrays(STATE)
    assert sorted(record) == [MANIFEST, VALUES]
    manifest_len = len(manifest_text(STATE))
    assert manifest_len == 78  # counted by hand in test_manifest_by_hand
    # .npy v1.0 headers are padded to a multiple of 64 bytes: 128 each here.
    assert record_bytes(record) == 15 * 4 + 128 + manifest_len + 128
    assert record_bytes(record) <= size_cap(STATE, 1.0)


def test_decoded_tensors_do_not_share_memory_with_each_other():
    back = decode(encode_arrays(STATE))
    back[A].add_(100.0)
    assert torch.equal(back[B], STATE[B]) and torch.equal(back[H], STATE[H])


def _objects(state):
    msg = TrainRequest("{}", (), 1, 2, 4.0, 0, state).to_message(5)
    return len(get_all_nested_objects(msg))


def test_a_message_is_the_same_few_objects_whatever_the_number_of_tensors():
    small = {f"l{i}.lora_A.weight": torch.randn(2, 3) for i in range(2)}
    large = {f"l{i}.lora_A.weight": torch.randn(2, 3) for i in range(400)}
    # Message, RecordDict, "config", "adapter" record, its two arrays and one chunk each.
    assert _objects(small) == _objects(large) == 8
    # The per-tensor form Flower builds from a state dict grows with the tensor count.
    per_tensor = TrainRequest("{}", (), 1, 2, 4.0, 0, large).to_message(5)
    per_tensor.content["adapter"] = ArrayRecord(large)
    assert len(get_all_nested_objects(per_tensor)) > 400


def test_a_packed_request_survives_flowers_object_transport_in_chunks():
    # What a SuperNode does: deflate every object, pull the contents, inflate the message.
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    big = {"l.lora_A.weight": torch.randn(1_500_000, generator=torch.Generator().manual_seed(0)), **STATE}
    msg = TrainRequest("{}", (), 1, 2, 4.0, 0, big).to_message(5)
    contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    assert len(contents) == 9  # 6 MB of values: two chunks of at most 5 MiB
    back = TrainRequest.from_message(inflate_object_from_contents(msg.object_id, contents))
    assert list(back.adapter) == list(big) and all(torch.equal(back.adapter[k], big[k]) for k in big)


def test_train_reply_round_trip_through_the_packed_update():
    from flwr.app import Message

    from fedlora.protocol import SetupQuery, UpdateExpectation, decode_train_reply

    query = SetupQuery("{}", ()).to_message(5)
    sent = TrainReply(40, STATE, {"train-loss": 0.5})
    got = decode_train_reply(Message(sent.to_content(), reply_to=query), UpdateExpectation(STATE, 40, 10**6))
    assert got.update_bytes == record_bytes(encode_arrays(STATE))
    assert all(torch.equal(got.update[k], STATE[k]) for k in STATE)


# --------------------------------------------------------------------------- forged layouts


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([[A, [2, 3], 0], [B, [4, 2], 5], [H, [1], 13]], "overlaps the previous tensor"),
        ([[A, [2, 3], 0], [B, [4, 2], 7], [H, [1], 15]], "leaves a gap after 6"),
        ([[A, [2, 3], 1], [B, [4, 2], 7], [H, [1], 15]], "leaves a gap after 0"),
        ([[A, [2, -3], 0], [B, [4, 2], 6], [H, [1], 14]], "dimension -3 is not an integer"),
        ([[A, [2, 3.0], 0], [B, [4, 2], 6], [H, [1], 14]], "dimension 3.0 is not an integer"),
        ([[A, [2, True], 0], [B, [4, 2], 6], [H, [1], 14]], "dimension True is not an integer"),
        ([[A, [2, "3"], 0], [B, [4, 2], 6], [H, [1], 14]], "dimension '3' is not an integer"),
        ([[A, [2, 2**41], 0], [B, [4, 2], 6], [H, [1], 14]], "is not an integer in 0.."),
        ([[A, [1] * 9, 0]], "at most 8 ints"),
        ([[A, 6, 0]], "shape must be a list"),
        ([[A, [2, 3], 0.0], [B, [4, 2], 6], [H, [1], 14]], "offset 0.0 is not an integer"),
        ([[A, [2, 3], 0], [A, [4, 2], 6], [H, [1], 14]], "names tensor 'm.lora_A.weight' twice"),
        ([[A, [2, 3], 0], [B, [4, 2], 6]], "omits 1 tensor(s), e.g. 'head.bias'"),
        ([*GOOD, ["extra.weight", [0], 15]], "has 1 unexpected tensor(s), e.g. 'extra.weight'"),
        ([[A, [3, 2], 0], [B, [4, 2], 6], [H, [1], 14]], "has shape (3, 2), expected (2, 3)"),
        ([[A, [2, 3], 0], [B, [4, 2], 6], [H, [2], 14]], "has shape (2,), expected (1,)"),
        ([[1, [2, 3], 0]], "name must be a string"),
        ([["", [2, 3], 0]], "name must be a string"),
        ([["x" * 513, [2, 3], 0]], "name must be a string"),
        ([[A, [2, 3]]], "is not [name, shape, offset]"),
        ([{"name": A}], "is not [name, shape, offset]"),
        ({"tensors": GOOD}, "must be a JSON list"),
    ],
)
def test_forged_manifests_are_refused(entries, reason):
    with pytest.raises(ProtocolError) as err:
        decode(forged(entries, VALS))
    assert reason in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        (VALS[:-1], "describes 15 values but the buffer holds 14"),
        (np.concatenate([VALS, VALS[:1]]), "describes 15 values but the buffer holds 16"),
        (VALS.astype(">f4"), "has dtype >f4, expected float32"),
        (VALS.astype("<f8"), "has dtype float64, expected float32"),
        (VALS.astype(np.float16), "has dtype float16, expected float32"),
        (VALS.reshape(3, 5), "expected a flat (1-D) array"),
    ],
)
def test_buffers_that_do_not_match_their_manifest_are_refused(values, reason):
    with pytest.raises(ProtocolError) as err:
        decode(forged(GOOD, values))
    assert reason in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (b"\xff\xfe[]", "not UTF-8 JSON"),
        (b"[[", "not UTF-8 JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not UTF-8 JSON"),  # recursion
        (b'[["a",[' + b"9" * 5000 + b"],0]]", "not UTF-8 JSON"),  # an int too long to parse
    ],
)
def test_manifests_that_are_not_json_are_refused(manifest, reason):
    with pytest.raises(ProtocolError) as err:
        decode(forged(manifest, VALS), reference=None)
    assert reason in str(err.value), str(err.value)


def test_records_of_another_form_are_refused():
    with pytest.raises(ProtocolError, match="must hold exactly the arrays"):
        decode(ArrayRecord(STATE))  # the per-tensor form
    with pytest.raises(ProtocolError, match="must hold exactly the arrays"):
        decode(ArrayRecord({**forged(GOOD, VALS), "x": manifest_array(b"[]")}))
    with pytest.raises(ProtocolError, match="not an ArrayRecord"):
        decode({"manifest": b"[]"})
    bad = forged(GOOD, VALS)
    bad[MANIFEST] = header_only("<f4", (3,), b"\0" * 12)
    with pytest.raises(ProtocolError, match="manifest' has dtype float32, expected uint8"):
        decode(bad)


def test_oversized_records_are_refused_before_reading_anything():
    record = forged(b"not even json", np.zeros(1000, dtype="<f4"))
    with pytest.raises(ProtocolError, match="above the cap of 2000 bytes"):
        decode(record, max_bytes=2000)


@pytest.mark.parametrize("reference", [STATE, None])
def test_huge_claims_are_refused_without_allocating_them(reference):
    # A manifest claiming 2^40 float32s (4 TiB) with offsets consistent with the claim, and a
    # values header claiming as many with 16 bytes behind it: refused with kilobytes allocated.
    entries = [[A, [2**20, 2**20], 0], [B, [4, 2], 2**40], [H, [1], 2**40 + 8]]
    records = [
        forged(entries, VALS),
        forged(GOOD, header_only("<f4", (2**40,), b"\0" * 16)),
        forged(entries, header_only("<f4", (2**40 + 9,), b"\0" * 16)),
    ]
    for record in records:
        tracemalloc.start()
        try:
            with pytest.raises(ProtocolError):
                decode(record, reference=reference)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 2**20, f"{peak} bytes allocated while refusing a forged record"


def test_a_manifest_larger_than_the_cap_on_manifests_is_refused(monkeypatch):
    import fedlora.protocol_arrays as pa

    monkeypatch.setattr(pa, "MAX_MANIFEST_BYTES", 50)
    with pytest.raises(ProtocolError, match="manifest is 78 bytes, above 50"):
        decode(encode_arrays(STATE))


# --------------------------------------------------------------------------- generated forgeries

dims = st.one_of(
    st.integers(min_value=-3, max_value=9),
    st.integers(min_value=2**30, max_value=2**64),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=2),
    st.none(),
)
entry = st.one_of(
    st.tuples(
        st.sampled_from([A, B, H, "x", ""]),
        st.lists(dims, max_size=3) | st.sampled_from([[2, 3], [4, 2], [1]]),
        st.integers(min_value=-2, max_value=20) | st.floats() | st.none(),
    ).map(list),
    st.lists(st.integers(), max_size=4),
    st.text(max_size=4),
)


@settings(derandomize=True, max_examples=150, deadline=None)
@given(
    st.lists(entry, max_size=4) | st.sampled_from([GOOD, GOOD[:2], GOOD[::-1]]),
    st.integers(min_value=0, max_value=20),
    st.sampled_from(["<f4", ">f4", "<f8", "|u1"]),
)
def test_generated_records_give_protocol_errors_or_exactly_the_reference(entries, count, dtype):
    try:
        got = decode(forged(entries, np.arange(count).astype(dtype)))
    except ProtocolError:
        return
    assert list(got) == [e[0] for e in entries]
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in STATE.items()}
