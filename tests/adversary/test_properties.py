"""Property-based tests: every generated bad input gives a fedlora error, never a raw traceback.

Config parsing (:class:`ConfigError`), data loading (:class:`DataError`) and reply decoding
(:class:`ProtocolError`) are fed generated values (NaN, inf, huge ints, lists, nested tables,
wrong types, random bytes); anything else escaping (TypeError, OverflowError, KeyError, numpy
or Flower errors) fails the test. Derandomized, so every run draws the same cases.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedlora.config import ConfigError, RunConfig, from_mapping, with_overrides
from fedlora.data.sources import DataError, load_task_data
from fedlora.protocol import (
    ProtocolError,
    SetupQuery,
    UpdateExpectation,
    decode_setup_reply,
    decode_train_reply,
)

SETTINGS = settings(
    derandomize=True, max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["inf", "-inf", "nan", "1e400", "1e3", "3.5", "", " ", "true", "[1]", "{}"]),
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=3), st.dictionaries(st.text(max_size=4), scalars, max_size=2)
)


def _keys() -> list[str]:
    return sorted(f"{s}.{k}" for s, d in RunConfig().to_dict().items() for k in d)


KEYS = _keys()


@SETTINGS
@given(st.dictionaries(st.sampled_from(KEYS), values, min_size=1, max_size=3))
def test_config_overrides_give_config_errors_only(overrides):
    try:
        with_overrides(RunConfig(), overrides)
    except ConfigError:
        pass


@SETTINGS
@given(
    st.dictionaries(
        st.sampled_from(sorted({k.split(".")[0] for k in KEYS})) | st.text(max_size=8),
        values
        | st.dictionaries(st.sampled_from(sorted({k.split(".")[1] for k in KEYS})), values, max_size=3),
        max_size=3,
    )
)
def test_config_tables_give_config_errors_only(tables):
    try:
        from_mapping(tables)
    except ConfigError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
rows = st.one_of(
    st.fixed_dictionaries({"text": st.text(min_size=1, max_size=8), "label": json_values}),
    st.dictionaries(st.sampled_from(["text", "label", "x"]), json_values, max_size=3),
    json_values,
)


@SETTINGS
@given(st.lists(rows, min_size=1, max_size=8), st.sampled_from(["jsonl", "csv"]))
def test_data_files_give_data_errors_only(generated, fmt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"d.{fmt}"
        if fmt == "jsonl":
            path.write_text("\n".join(json.dumps(r) for r in generated) + "\n")
        else:
            lines = [
                "text,label",
                *(",".join(str(v) for v in (r.values() if isinstance(r, dict) else [r])) for r in generated),
            ]
            path.write_text("\n".join(lines) + "\n")
        cfg = with_overrides(RunConfig(), {"data.source": str(path), "data.test_fraction": 0.3})
        try:
            load_task_data(cfg.data, "classification")
        except DataError:
            pass


@pytest.fixture(scope="module")
def _identity():
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved


REFERENCE = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(4, 2)}
metric_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.integers(min_value=-(2**31), max_value=2**31), max_size=3),
    st.lists(st.floats(allow_nan=True), max_size=3),
)
metric_records = st.dictionaries(
    st.sampled_from(["num-examples", "train-loss", "kind", "round", "NODE", "x" * 60, "steps", "declined"]),
    metric_values,
    max_size=4,
)


@st.composite
def arrays(draw):
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "int32", "bool", "uint8"]))
    shape = draw(st.sampled_from([(2, 3), (4, 2), (3, 2), (0,), (2**20, 2**20), ()]))
    kind = draw(st.sampled_from(["numpy", "random bytes", "header only"]))
    if kind == "numpy" and np.prod(shape, dtype=object) < 100:
        data = np.zeros(shape, dtype=dtype)
        return Array(data)
    if kind == "header only":
        import io

        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(
            buf, {"descr": np.dtype(dtype).str, "fortran_order": False, "shape": shape}
        )
        return Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=buf.getvalue())
    data = draw(st.binary(max_size=64))
    return Array(dtype=dtype, shape=shape, stype=draw(st.sampled_from(["numpy.ndarray", "torch"])), data=data)


@SETTINGS
@given(
    metric_records,
    # Packed records hold "manifest" and "values" (fedlora/protocol_arrays.py); forged
    # manifests and buffers are generated in tests/adversary/test_packed.py.
    st.dictionaries(st.sampled_from(["manifest", "values", "m.lora_A.weight"]), arrays(), max_size=3),
    st.one_of(st.none(), st.text(max_size=20), st.just('{"a": 1}'), st.just("[" * 5000)),
)
def test_train_replies_give_protocol_errors_only(_identity, metrics, update, ledger):
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if update:
        content["update"] = ArrayRecord(update)
    if ledger is not None:
        content["privacy"] = ConfigRecord({"ledger": ledger})
    msg = Message(content, reply_to=SetupQuery("{}", ()).to_message(5))
    try:
        reply = decode_train_reply(msg, UpdateExpectation(REFERENCE, 40, 10_000))
    except ProtocolError:
        return
    assert reply.declined or set(reply.update or {}) == set(REFERENCE)


config_values = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.booleans(),
    st.lists(st.integers(min_value=0, max_value=9), max_size=2),
)


@SETTINGS
@given(
    st.dictionaries(st.sampled_from(["rank", "alpha", "num-examples", "partition-id", "x"]), config_values)
)
def test_setup_replies_give_protocol_errors_only(_identity, info):
    msg = Message(RecordDict({"info": ConfigRecord(info)}), reply_to=SetupQuery("{}", ()).to_message(5))
    try:
        reply = decode_setup_reply(msg, max_rank=384)
    except ProtocolError:
        return
    assert 1 <= reply.rank <= 384 and reply.alpha > 0 and reply.num_examples >= 0
