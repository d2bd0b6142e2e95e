"""A server that picks the label list cannot learn from a record-DP node whether one record exists.

The attack: nodes A and B differ in one record (B's is labelled 'rare'); the server's setup
query lists only 'cat' and 'dog'. A replied normally and B refused (DataError): certainty from
one query that spends no budget. Under record DP a bad row now becomes a public filler record.
"""

import json

import pytest
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.app import app
from fedlora.config import RunConfig, with_overrides
from fedlora.protocol import QUERY

BASE = [{"text": f"ordinary record {i}", "label": "cat" if i % 2 else "dog"} for i in range(40)]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def setup_reply(path: str, mode: str, **extra) -> dict:
    # What the server sends: task and max_length already derived.
    over = {
        "privacy.mode": mode,
        "federation.num_clients": 2,
        "lora.rank": 4,
        "model.task": "classification",
        "model.max_length": 32,
        **extra,
    }
    if mode == "record":
        over["privacy.noise_multiplier"] = 1.0
    cfg = with_overrides(RunConfig(), over)
    node_config = {"partition-id": 0, "num-partitions": 2, "data-path": path}
    if mode == "record":
        node_config["dp-epsilon"] = 4.0
    ctx = Context(run_id=1, node_id=10, node_config=node_config, state=RecordDict(), run_config={})
    conf = ConfigRecord({"run-config": cfg.to_json(), "labels": json.dumps(["cat", "dog"])})
    reply = app(Message(RecordDict({"config": conf}), dst_node_id=10, message_type=QUERY), ctx)
    return dict(reply.content["info"])


@pytest.mark.parametrize(
    "odd",
    [{"text": "the one sensitive record", "label": "rare"}, {"text": "   ", "label": "cat"}, {"text": "x"}],
)
def test_one_odd_record_changes_nothing_the_server_sees(task_identity, tmp_path, odd):
    a = write(tmp_path / "a.jsonl", BASE)
    b = write(tmp_path / "b.jsonl", [*BASE[:-1], odd])
    assert setup_reply(a, "record") == setup_reply(b, "record")


def test_without_dp_the_odd_record_is_still_an_error(task_identity, tmp_path):
    b = write(tmp_path / "b.jsonl", [*BASE[:-1], {"text": "the one sensitive record", "label": "rare"}])
    with pytest.raises(Exception, match="refused the setup request"):
        setup_reply(b, "none")


def test_a_record_dp_node_does_not_derive_settings_from_its_records(task_identity, tmp_path):
    # Deriving task / max_length on the node reads every record strictly and sizes the work by the
    # node's own record lengths; under record DP the node refuses a config that asks for it.
    a = write(tmp_path / "a.jsonl", BASE)
    with pytest.raises(Exception, match="refused the setup request"):
        setup_reply(a, "record", **{"model.max_length": 0})
    assert setup_reply(a, "record")["num-examples"] > 0
