"""No single reply can crash the server: each crafted reply is rejected with a reason and the run goes on.

Every test drives the real :class:`server.loop.ServerRun` on a :class:`FakeGrid` whose node 14
sends the crafted reply named in the test; three honest nodes keep the round alive. Against
the server before the protocol module, each of these replies stopped the ServerApp with a
traceback (OverflowError, MemoryError, TypeError, json.JSONDecodeError) or slipped through.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedlora.protocol import INFO, METRICS, PRIVACY, UPDATE, encode_arrays
from fedlora.protocol_arrays import manifest_entries
from tests.adversary.fakegrid import grid_of
from tests.adversary.packing import forged, header_only, unpacked

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


def test_gigantic_manifest_shape_is_refused_before_allocation(run_fed):
    # The manifest claims 2^40 float32s (4 TiB) for one tensor; the buffer is the honest one.
    def craft(msg, content):
        arrays = unpacked(content[UPDATE])
        entries = manifest_entries(arrays)
        entries[0][1] = [2**20, 2**20]
        for e in entries[1:]:  # offsets consistent with the claim: only the shape is a lie
            e[2] += 2**40 - arrays[entries[0][0]].numel()
        content[UPDATE] = forged(entries, np.concatenate([v.numpy().ravel() for v in arrays.values()]))
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "has shape (1048576, 1048576)")


def test_gigantic_values_header_is_refused_before_allocation(run_fed):
    # An honest manifest, but the values' .npy header claims 2^40 float32s and carries 16 bytes.
    def craft(msg, content):
        arrays = unpacked(content[UPDATE])
        content[UPDATE] = forged(manifest_entries(arrays), header_only("<f4", (2**40,), b"\0" * 16))
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "claims shape (1099511627776,)")


def test_oversized_update_record_is_refused_unread(run_fed):
    def craft(msg, content):
        arrays = unpacked(content[UPDATE])
        arrays["padding.weight"] = torch.zeros(4_000_000)
        content[UPDATE] = encode_arrays(arrays)
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


@pytest.mark.parametrize("dtype", [np.int32, np.bool_, np.float16, np.float64, ">f4"])
def test_deltas_of_another_dtype_are_refused(run_fed, dtype):
    def craft(msg, content):
        arrays = unpacked(content[UPDATE])
        count = sum(v.numel() for v in arrays.values()) * 4 // np.dtype(dtype).itemsize  # same bytes
        content[UPDATE] = forged(manifest_entries(arrays), np.zeros(count, dtype=dtype))
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "expected float32")


def test_update_that_omits_tensors_is_rejected(run_fed):
    def craft(msg, content):
        arrays = unpacked(content[UPDATE])
        content[UPDATE] = encode_arrays({k: arrays[k] for k in sorted(arrays)[:1]})
        return content

    run = run_fed(grid_of(4, {EVIL: craft}))
    _check_continues(run, "omits")
