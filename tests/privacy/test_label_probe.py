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


@pytest.mark.parametrize(
    "odd_line",
    ["{not json", "[1, 2, 3]", json.dumps({"label": "cat"}), json.dumps({"text": "x", "label": {"a": 1}})],
)
def test_no_single_malformed_line_changes_the_setup_reply(task_identity, tmp_path, odd_line):
    a = write(tmp_path / "a.jsonl", BASE)
    rows = [json.dumps(r) for r in BASE[:-1]]
    (tmp_path / "b.jsonl").write_text("\n".join([odd_line, *rows]) + "\n")  # even as the first row
    assert setup_reply(a, "record") == setup_reply(str(tmp_path / "b.jsonl"), "record")


def test_a_train_round_on_a_file_with_bad_rows_trains_like_any_other(task_identity, tmp_path):
    from tests.test_client_app import _template, _train_msg

    lines = [json.dumps({"text": "\ud800 lone surrogate", "label": "cat"}), "{not json"]
    lines += [json.dumps(r) for r in BASE[:-2]]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n")
    over = {
        "privacy.mode": "record",
        "privacy.noise_multiplier": 1.0,
        "federation.num_clients": 2,
        "lora.rank": 4,
        "model.task": "classification",
        "model.max_length": 16,
        "train.local_steps": 1,
        "train.batch_size": 8,
    }
    cfg = with_overrides(RunConfig(), over)
    node_config = {
        "partition-id": 0,
        "num-partitions": 2,
        "data-path": str(tmp_path / "b.jsonl"),
        "dp-epsilon": 8.0,
    }
    ctx = Context(run_id=1, node_id=10, node_config=node_config, state=RecordDict(), run_config={})
    msg = _train_msg(
        cfg, _template(), labels=json.dumps(["cat", "dog", "eel", "fox"])
    )  # 4: the template head
    reply = app(msg, ctx)
    assert dict(reply.content["metrics"])["dp-steps"] == 1


def test_a_huge_received_value_is_refused_whatever_the_data():
    # A finite head of 1e37 overflowed one chosen record's logits to inf: the non-finite-loss error then
    # said whether that record was there. The refusal now depends on the message alone.
    import torch

    from clients.round import MAX_RECEIVED_ABS, PayloadError, check_received_magnitude

    check_received_magnitude({"head": torch.full((2, 2), MAX_RECEIVED_ABS)})
    with pytest.raises(PayloadError, match="magnitude"):
        check_received_magnitude({"head": torch.tensor([[1.6e37, 0.0]])})


def test_lenient_reading_and_fillers_for_instruction_data(tmp_path):
    from clients.privacy import bounded_text
    from fedlora.data.sources import FILLER_INSTRUCTION, DataError, instruction_records, read_rows

    path = tmp_path / "i.jsonl"
    path.write_text(
        '{"instruction": "q", "response": "a"}\n{broken\n{"instruction": "q2", "response": null}\n'
    )
    with pytest.raises(DataError, match="not valid JSON"):
        read_rows(str(path))
    rows = read_rows(str(path), lenient=True)
    cfg = RunConfig()
    records = instruction_records(rows, cfg.data, str(path), filler=True)
    assert records == [{"instruction": "q", "response": "a"}, FILLER_INSTRUCTION, FILLER_INSTRUCTION]
    cut = bounded_text([{"text": "ok \ud800 end"}], with_overrides(RunConfig(), {"model.max_length": 8}))
    assert cut[0]["text"].encode("utf-8")  # valid UTF-8: no tokenizer error on a lone surrogate
