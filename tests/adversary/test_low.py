"""The low findings of the hostile-node probe, each played as an attack that failed before.

A node sends terminal escapes in its error reason, reports a train loss of -2.5e14, or answers
in another node's name; a checkpoint holds NaN or round 10^9; a reply's manifest is huge for a
tiny adapter; ``--data`` names a FIFO; a JSON label is ``true``; a certificate is asked for ``*``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, Error, Message, MetricRecord, RecordDict

from fedlora.checkpoint import load_checkpoint, save_checkpoint
from fedlora.config import DataConfig
from fedlora.data.sources import DataError, classification_records, read_rows
from fedlora.deploy.certs import parse_san
from fedlora.protocol import METRICS, TRAIN, ProtocolError, decode_arrays
from fedlora.protocol_arrays import MANIFEST, MANIFEST_DTYPE, VALUES, manifest_cap
from server.loop import UNATTRIBUTED, ServerRun, reply_nodes
from server.resume import ResumeError
from tests.adversary.fakegrid import grid_of, small_config

EVIL = 14
ESCAPES = "\x1b[2J\x1b]0;owned\x07\r\u202e"


def test_terminal_escapes_in_a_node_error_never_reach_the_console_or_the_metrics(run_fed, capsys):
    def craft(msg, content):
        return Message(Error(code=0, reason=f"boom {ESCAPES}"), reply_to=msg)

    run = run_fed(grid_of(4, {EVIL: craft}), **{"federation.num_rounds": 1})
    reason = run.rejected(1)[EVIL]
    assert "boom" in reason and not any(c in reason for c in "\x1b\x07\r\u202e")
    assert "\\x1b[2J" in reason  # shown, escaped
    assert "\x1b" not in capsys.readouterr().out and "\x1b" not in (run.out / "metrics.jsonl").read_text()


def test_one_node_cannot_set_the_reported_train_loss(run_fed):
    def craft(msg, content):
        content[METRICS] = MetricRecord({**dict(content[METRICS]), "train-loss": -2.5e14})
        return content

    run = run_fed(grid_of(4, {EVIL: craft}), **{"federation.num_rounds": 1})
    assert 1.0 <= run.glob(1)["train_loss"] <= 1.3  # the honest nodes report 1.0 to 1.2


def _finished(tmp_path: Path, monkeypatch) -> Path:
    import server.loop

    monkeypatch.setattr(server.loop, "plot_metrics", lambda *a, **k: None)
    out = tmp_path / "run"
    ServerRun(grid_of(2), small_config(out, **{"federation.num_clients": 2}), out).run()
    return out


def _resume(out: Path, **over: object) -> None:
    conf = {"federation.num_clients": 2, "output.resume": True, **over}
    ServerRun(grid_of(2), small_config(out, **conf), out).run()


@pytest.mark.parametrize(
    ("tamper", "match"),
    [
        (lambda c: c["state"].update({k: v * float("nan") for k, v in c["state"].items()}), "non-finite"),
        (lambda c: c.update(round=10**9), "round 1000000000, outside 0..2"),
    ],
)
def test_a_checkpoint_with_nan_tensors_or_an_absurd_round_is_refused(
    tmp_path, monkeypatch, task_identity, tamper, match
):
    out = _finished(tmp_path, monkeypatch)
    ckpt = load_checkpoint(out / "checkpoint.pt")
    tamper(ckpt)
    save_checkpoint(out / "checkpoint.pt", ckpt)
    (out / "checkpoint.pt.prev").unlink()
    with pytest.raises(ResumeError, match=match):
        _resume(out)


def test_a_refused_resume_leaves_config_toml_alone(tmp_path, monkeypatch, task_identity):
    out = _finished(tmp_path, monkeypatch)
    before = (out / "config.toml").read_text()
    with pytest.raises(ResumeError):
        _resume(out, **{"federation.strategy": "flora"})
    assert (out / "config.toml").read_text() == before


def test_a_reply_counts_only_for_the_node_that_was_asked_and_sent_it(task_identity):
    msgs = [Message(RecordDict(), dst_node_id=n, message_type=TRAIN) for n in (11, 14)]
    for m in msgs:
        m.metadata.__dict__["_message_id"] = f"id-{m.metadata.dst_node_id}"

    def reply(to: Message, src: int, error: bool = False) -> Message:
        r = (
            Message(Error(code=0, reason="gone"), reply_to=to)
            if error
            else Message(RecordDict(), reply_to=to)
        )
        r.metadata.__dict__["_src_node_id"] = src
        return r

    forged = reply(msgs[0], 14)  # node 14 answers node 11's message
    own, superlink = reply(msgs[1], 14), reply(msgs[0], 1, error=True)
    assert reply_nodes(msgs, [forged, own, superlink]) == [UNATTRIBUTED, 14, 11]
    assert reply_nodes(msgs, [reply(msgs[0], 1)]) == [UNATTRIBUTED]  # the SuperLink sends only errors


def test_the_manifest_cap_follows_the_expected_adapter():
    reference = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
    cap = manifest_cap(reference)
    assert cap < 5000
    import numpy as np
    from flwr.app import Array

    big = Array(np.zeros(cap + 1, dtype=MANIFEST_DTYPE))
    record = ArrayRecord({MANIFEST: big, VALUES: Array(np.zeros(16, dtype=np.float32))})
    started = time.perf_counter()
    with pytest.raises(ProtocolError, match=f"manifest is {cap + 1} bytes, above {cap}"):
        decode_arrays(record, reference, max_bytes=2**30)
    assert time.perf_counter() - started < 1.0


def test_data_on_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    with pytest.raises(DataError, match="not a regular file"):
        read_rows(str(fifo))


def test_a_json_boolean_label_is_refused(tmp_path):
    rows = [{"text": "a", "label": True, "__where__": "line 1"}, {"text": "b", "label": "no"}]
    with pytest.raises(DataError, match="boolean label True"):
        classification_records(rows, DataConfig(), "rows.jsonl")
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": v}) for t, v in (("a", True), ("b", False))))
    with pytest.raises(DataError, match="boolean label"):
        classification_records(read_rows(str(path)), DataConfig(), str(path))


@pytest.mark.parametrize("san", ["*", "*.com", "0.0.0.0", "::", "a.*.example.org", "224.0.0.1"])
def test_certificates_for_any_host_are_refused(san):
    with pytest.raises(ValueError, match="Invalid SAN"):
        parse_san(san)
    assert parse_san("*.fed.example.org").value == "*.fed.example.org"
