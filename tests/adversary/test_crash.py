"""No single reply can crash the server: each crafted reply is rejected with a reason and the run goes on.

Every test drives the real :class:`server.loop.ServerRun` on a :class:`FakeGrid` whose node 14
sends the crafted reply named in the test; three honest nodes keep the round alive. Against
the server before the protocol module, each of these replies stopped the ServerApp with a
traceback (OverflowError, MemoryError, TypeError, json.JSONDecodeError) or slipped through.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedlora.protocol import INFO, METRICS, PRIVACY, UPDATE
from tests.adversary.fakegrid import grid_of

EVIL = 14


def _with_metric(key, value):
    def craft(msg, content):
        metrics = dict(content[METRICS])
        metrics[key] = value
        content[METRICS] = MetricRecord(metrics)
        return content

    return craft


def _check_continues(run, reason_part, rnd=1):
    rejected = run.rejected(rnd)
    assert EVIL in rejected and reason_part in rejected[EVIL], rejected
    assert run.glob(run.rows[-1]["round"])["round"] == 2  # every round ran
    assert run.glob(rnd)["clients_ok"] == 3 and run.finite()
    assert (run.out / "adapter").is_dir()


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("inf"), "num-examples must be an integer"),
        (float("nan"), "num-examples must be an integer"),
        (40.0, "num-examples must be an integer"),
        (-1, "num-examples must be in 0.."),
        (41, "differs from the node's setup reply (40)"),
    ],
)
def test_bad_example_counts_are_rejected(run_fed, value, reason):
    run = run_fed(grid_of(4, {EVIL: _with_metric("num-examples", value)}))
    _check_continues(run, reason)


def _huge_header_array() -> Array:
    # A valid .npy header claiming 2^40 float32s (4 TiB), with 16 bytes of data.
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "<f4", "fortran_order": False, "shape": (2**20, 2**20)}
    )
    data = buf.getvalue() + b"\0" * 16
    return Array(dtype="float32", shape=(2**20, 2**20), stype="numpy.ndarray", data=data)


def test_gigantic_array_header_is_refused_before_allocation(run_fed):
    def craft(msg, content):
        arrays = dict(content[UPDATE].items())
        name = sorted(arrays)[0]
        arrays[name] = _huge_header_array()
        content[UPDATE] = ArrayRecord(arrays)
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "has shape (1048576, 1048576)")


def test_oversized_update_record_is_refused_unread(run_fed):
    def craft(msg, content):
        arrays = dict(content[UPDATE].items())
        arrays["padding.weight"] = Array(np.zeros(4_000_000, dtype=np.float32))
        content[UPDATE] = ArrayRecord(arrays)
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "above the cap")


@pytest.mark.parametrize("value", [[1.0, 2.0], "low", float("nan"), 1e300])
def test_wrongly_typed_metrics_are_rejected(run_fed, value):
    def craft(msg, content):
        metrics = {k: v for k, v in content[METRICS].items()}
        content[METRICS] = MetricRecord({**metrics, "train-loss": 0.0})
        if isinstance(value, str):
            content["metrics"] = RecordDict({"m": ConfigRecord({"x": value})})["m"]  # a ConfigRecord
        else:
            content[METRICS] = MetricRecord({**metrics, "train-loss": value})
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    assert EVIL in run.rejected(1) and run.finite()


def test_metrics_cannot_spoof_rows(run_fed):
    spoof = {"kind": 7, "round": 99, "node": 11}
    grid = grid_of(4, {EVIL: lambda m, c: _spoof(c, spoof)})
    run = run_fed(grid)
    rows = [r for r in run.rows if r["kind"] == "client" and r["round"] == 1]
    evil = next(r for r in rows if r["node"] == EVIL)
    assert evil["client"]["kind"] == 7 and evil["client"]["round"] == 99  # filed under the client
    assert sorted(r["node"] for r in rows) == [11, 12, 13, 14]
    assert all(r["kind"] in ("client", "global") for r in run.rows)


def _spoof(content, spoof):
    content[METRICS] = MetricRecord({**dict(content[METRICS]), **spoof})
    return content


def test_ledger_that_is_not_json_is_rejected(run_fed):
    def craft(msg, content):
        content[PRIVACY] = ConfigRecord({"ledger": "{not json"})
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "privacy ledger is not valid JSON")


@pytest.mark.parametrize(
    ("info", "reason"),
    [
        ({"alpha": 4.0, "num-examples": 40, "partition-id": 3}, "lacks 'rank'"),
        ({"rank": 0, "alpha": 4.0, "num-examples": 40, "partition-id": 3}, "'rank' must be in 1.."),
        ({"rank": "8", "alpha": 4.0, "num-examples": 40, "partition-id": 3}, "must be an integer"),
        ({"rank": 10**6, "alpha": 4.0, "num-examples": 40, "partition-id": 3}, "'rank' must be in 1..384"),
        (
            {"rank": 2, "alpha": float("nan"), "num-examples": 40, "partition-id": 3},
            "'alpha' must be a finite",
        ),
    ],
)
def test_malformed_setup_reply_leaves_the_node_out(run_fed, info, reason):
    grid = grid_of(4)
    grid.setup_crafted[EVIL] = lambda msg, content: RecordDict({INFO: ConfigRecord(info)})
    run = run_fed(grid)
    assert reason in run.rejected(0)[EVIL]
    assert run.glob(1)["clients_sampled"] == 3 and run.glob(2)["clients_ok"] == 3 and run.finite()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.float16, torch.float64])
def test_deltas_of_another_dtype_are_refused(run_fed, dtype):
    def craft(msg, content):
        arrays = {k: Array(torch.zeros(a.shape, dtype=dtype).numpy()) for k, a in content[UPDATE].items()}
        content[UPDATE] = ArrayRecord(arrays)
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "expected float32")


def test_update_that_omits_tensors_is_rejected(run_fed):
    def craft(msg, content):
        arrays = dict(content[UPDATE].items())
        content[UPDATE] = ArrayRecord({k: arrays[k] for k in sorted(arrays)[:1]})
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "omits")


def test_client_error_reply_is_rejected(run_fed):
    from flwr.app import Error, Message

    def craft(msg, content):
        return Message(Error(code=0, reason="boom"), reply_to=msg)

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "client error: boom")



def test_ledger_of_the_wrong_kind_is_rejected_under_record_dp(run_fed):
    # Valid JSON, but the client-level ledger of another client: the server's ledger code
    # (server/privacy.py) refuses it with a ValueError, which must become a rejection.
    ledger = {"client_id": "client-0", "unit": "client", "delta": 1e-5, "max_grad_norm": 1.0, "entries": []}

    def craft(msg, content):
        content[PRIVACY] = ConfigRecord({"ledger": json.dumps(ledger)})
        return content

    dp = {"privacy.mode": "record", "privacy.noise_multiplier": 1.0}
    run = run_fed(grid_of(4, {EVIL: craft}), **dp)
    _check_continues(run, "malformed privacy ledger")
