"""The server cannot weaken a node's privacy or make it read (and quote) data it did not choose.

The attacker is the server: it sends the real ClientApp (called in-process) a run config of its
choosing. Before :mod:`clients.floor`, ``privacy.mode = "none"`` made a node started with
``dp-epsilon = 4`` train without noise, ``data.label_column = "text"`` made a node quote a
private record in its error reply, and ``data.source`` made a node without ``data-path`` read
any file and quote its first line.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from clients.app import NodeRefused, app
from clients.floor import FloorError
from clients.privacy import STATE_ROOT_ENV
from fedlora.protocol import QUERY
from tests.test_client_app import LABELS, _cfg, _context, _template, _train_msg

SECRET = "patient 4711 has a rare condition"
DP_NODE = {"dp-epsilon": 4.0}


@pytest.fixture(autouse=True)
def _deployed(monkeypatch, task_identity):
    monkeypatch.delenv(STATE_ROOT_ENV, raising=False)  # a real SuperNode, not `fedlora simulate`


def _query(run_config: str) -> Message:
    conf = ConfigRecord({"run-config": run_config, "labels": json.dumps(LABELS)})
    return Message(RecordDict({"config": conf}), dst_node_id=10, message_type=QUERY)


def _refusal(call) -> NodeRefused:
    with pytest.raises(NodeRefused) as err:
        call()
    return err.value


@pytest.mark.parametrize(
    ("over", "node", "why"),
    [
        ({}, {}, "privacy.mode = 'none' would switch off"),
        ({"privacy.mode": "client", "privacy.noise_multiplier": 1.0}, {}, "privacy.mode = 'client'"),
        ({"privacy.mode": "record", "privacy.delta": 1e-3}, {}, "delta = 0.001 is above this node's"),
        (
            {"privacy.mode": "record", "privacy.max_grad_norm": 50.0},
            {"dp-max-grad-norm": 1.0},
            "max_grad_norm = 50 is above",
        ),
    ],
)
def test_a_dp_node_refuses_a_run_that_weakens_its_floor(over, node, why):
    cfg = _cfg(**{"privacy.epsilon": 4.0, **over})
    context = _context(**DP_NODE, **node)
    for call in (
        lambda: app(_train_msg(cfg, _template()), context),
        lambda: app(_query(cfg.to_json()), context),
    ):
        err = _refusal(call)
        assert isinstance(err.__cause__, FloorError) and why in str(err.__cause__)
        assert "refused the" in str(err) and "mode" not in str(err)


def test_a_delta_of_a_third_is_refused_everywhere():
    text = json.loads(_cfg(**{"privacy.mode": "record", "privacy.epsilon": 4.0}).to_json())
    text["privacy"]["delta"] = 0.3  # the server's config would refuse it; a hostile server sends it raw
    err = _refusal(lambda: app(_query(json.dumps(text)), _context()))  # even a node without a floor
    assert "privacy.delta = 0.3" in str(err.__cause__) and "0.3" not in str(err)


def test_a_dp_node_trains_under_its_floor():
    cfg = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 1.0, "privacy.epsilon": 4.0})
    reply = app(_train_msg(cfg, _template()), _context(**DP_NODE, **{"dp-delta": 1e-5}))
    assert not reply.has_error() and dict(reply.content["metrics"])["dp-steps"] == 2


def _node_file(tmp_path: Path, header: str = "text,label") -> Path:
    rows = [f"{SECRET} #{i},{LABELS[i % 4]}" for i in range(24)]
    path = tmp_path / "site.csv"
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_the_servers_column_names_do_not_change_what_the_node_reads(tmp_path):
    path = _node_file(tmp_path)
    cfg = _cfg(**{"data.label_column": "text", "data.text_column": "label"})
    reply = app(_query(cfg.to_json()), _context(**{"data-path": str(path)}))
    assert not reply.has_error() and reply.content["info"]["num-examples"] > 0  # its own columns
    custom = _node_file(tmp_path, "note,diagnosis")
    node = {"data-path": str(custom), "text-column": "note", "label-column": "diagnosis"}
    assert not app(_query(cfg.to_json()), _context(**node)).has_error()


def test_an_error_reply_never_quotes_a_record(tmp_path):
    path = _node_file(tmp_path, "text,category")  # no 'label' column: the node cannot read it
    err = _refusal(lambda: app(_query(_cfg().to_json()), _context(**{"data-path": str(path)})))
    assert "patient" not in str(err) and "site.csv" not in str(err)
    assert "refused the setup request" in str(err)


def test_a_node_without_data_path_reads_no_file_the_server_names(tmp_path):
    path = _node_file(tmp_path)
    cfg = _cfg(**{"data.source": str(path)})
    err = _refusal(lambda: app(_query(cfg.to_json()), _context()))
    assert isinstance(err.__cause__, FloorError) and "set data-path" in str(err.__cause__)
    assert "patient" not in str(err)


def test_nothing_is_derived_from_a_file_the_server_names(tmp_path, monkeypatch):
    import fedlora.data.sources

    opened: list[str] = []
    real = fedlora.data.sources.read_rows

    def spy(source, *args, **kwargs):
        opened.append(str(source))
        return real(source, *args, **kwargs)

    monkeypatch.setattr(fedlora.data.sources, "read_rows", spy)
    path = _node_file(tmp_path)
    cfg = _cfg(**{"data.source": str(path), "model.task": "auto", "model.max_length": 0})
    err = _refusal(lambda: app(_query(cfg.to_json()), _context()))  # the server left the task to derive
    assert isinstance(err.__cause__, FloorError) and opened == []
