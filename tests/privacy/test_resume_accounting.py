"""Accounting that never under-counts: crashes, resumes, empty rounds and the ε budget on the server.

A round in flight when the server stops may have been trained, and its update released,
although no checkpoint records it; the resumed run redoes it. These tests stop a
:class:`server.privacy.ServerPrivacy` between dispatch and checkpoint, start a new one on
the same run directory as ``--resume`` does, and check what is charged.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from clients.node import node_settings
from clients.privacy import STATE_ROOT_ENV, state_dir
from fedlora.config import RunConfig, with_overrides
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.runfile import CLIENT_LEVEL_KEY, load_run_file
from server.privacy import ServerPrivacy
from strategies.registry import create

NAME = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"


class Reply:
    """What the server's observe_reply reads of a reply message: its content records."""

    def __init__(self, ledger: PrivacyLedger) -> None:
        self.content = RecordDict({"privacy": ConfigRecord({"ledger": ledger.to_json()})})


def cfg_for(mode: str, **over) -> RunConfig:
    base = {
        "privacy.mode": mode,
        "privacy.noise_multiplier": 1.0,
        "privacy.accountant": "rdp",
        "federation.num_clients": 4,
        "federation.num_rounds": 3,
        "train.batch_size": 8,
    }
    return with_overrides(RunConfig(), {**base, **over})


def resumed(cfg: RunConfig) -> RunConfig:
    return with_overrides(cfg, {"output.resume": True})


def test_record_round_in_flight_at_a_crash_is_charged_unless_the_client_proves_it(tmp_path: Path):
    cfg = cfg_for("record")
    first = ServerPrivacy(cfg, tmp_path)
    first.before_dispatch(1, {11: (0, 40)}, run_id="7")
    own = PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1.0, 0.2, 5, run="7")
    first.observe_reply(11, 0, Reply(own))
    first.round_summary(1)
    checkpoint = first.state_dict()  # the loop checkpoints after round 1 ...
    first.before_dispatch(2, {11: (0, 40)}, run_id="7")  # ... sends round 2, and the server dies
    assert load_run_file(tmp_path)["pending"] == [
        {"key": "client-0", "run": "7", "round": 2, "num_examples": 40}
    ]

    again = ServerPrivacy(resumed(cfg), tmp_path)
    again.load_state_dict(checkpoint)
    ledger = again.ledgers["client-0"]
    assert ledger.pending_rounds == [("7", 2)]  # worst case: round 2 was trained and released
    two_rounds = own.record(2, 1.0, 0.2, 5, run="7")
    assert ledger.epsilon("rdp") == pytest.approx(two_rounds.epsilon("rdp"))
    # A client that lost its state gets the charge back with its copy: its redo is a third entry.
    copy = PrivacyLedger.from_json(again.client_conf(0, 11)["privacy-ledger"])
    assert copy.next_round("7", 2) == 3
    # A client that kept its state proves what round 2 was: its entry replaces the charge.
    again.observe_reply(11, 0, Reply(two_rounds))
    assert again.ledgers["client-0"].pending_rounds == [] and len(again.ledgers["client-0"].entries) == 2
    assert again.resumes == [{"after_round": 2, "charged": 1}]


def test_a_client_without_any_recorded_round_is_charged_its_planned_round(tmp_path: Path):
    cfg = cfg_for("record", **{"privacy.epsilon": 4.0})
    ServerPrivacy(cfg, tmp_path).before_dispatch(1, {11: (0, 40), 12: (1, 24)}, run_id="7")
    again = ServerPrivacy(resumed(cfg), tmp_path)
    for key, n in (("client-0", 40), ("client-1", 24)):
        (entry,) = again.ledgers[key].entries
        assert entry.pending and entry.noise_multiplier == 1.0
        assert entry.sample_rate == pytest.approx(1 / -(-n // 8)) and entry.steps > 0
        assert again.ledgers[key].epsilon("rdp") > 0


def _client_round(priv: ServerPrivacy, strategy, state, rnd: int):
    priv.before_dispatch(rnd, {}, run_id="7")  # Poisson sampling picked nobody, or every update was bad
    state = strategy.aggregate(state, [])
    priv.round_summary(rnd)
    return state


def test_client_mode_releases_and_charges_every_round_and_stops_at_the_budget(tmp_path: Path):
    three = PrivacyLedger("x", "client", 1e-5, 1.0)
    for r in (1, 2, 3):
        three = three.record(r, 1.0, 0.5, 1)
    four = three.record(4, 1.0, 0.5, 1)
    target = (three.epsilon("rdp") + four.epsilon("rdp")) / 2  # 3 releases fit, 4 do not
    over = {
        "privacy.epsilon": target,
        "privacy.client_sampling": "poisson",
        "privacy.client_sample_rate": 0.5,
    }
    cfg = cfg_for("client", **over)
    priv = ServerPrivacy(cfg, tmp_path)
    strategy = priv.wrap(create("fedit"))
    state0 = {NAME: torch.zeros(8, 4)}
    state = state0
    for rnd in (1, 2):
        state = _client_round(priv, strategy, state, rnd)
        checkpoint = priv.state_dict()
    assert len(priv.ledgers[CLIENT_LEVEL_KEY].entries) == 2  # a round without updates is still a step
    assert not torch.equal(state[NAME], state0[NAME])  # ... whose noisy (empty) sum was released
    assert priv.budget_stop(3) is None  # 3 releases fit the target
    priv.before_dispatch(3, {}, run_id="7")  # round 3 goes out; the server dies before its checkpoint
    again = ServerPrivacy(resumed(cfg), tmp_path)
    again.load_state_dict(checkpoint)
    assert again.ledgers[CLIENT_LEVEL_KEY].pending_rounds == [("7", 3)]
    stop = again.budget_stop(3)  # redoing round 3 would be a 4th release
    assert stop is not None and "stopping before round 3" in stop and f"past the target {target:g}" in stop


def test_simulated_nodes_keep_their_state_inside_the_run_dir(tmp_path: Path, monkeypatch):
    cfg = cfg_for("record")
    monkeypatch.delenv(STATE_ROOT_ENV, raising=False)
    assert state_dir(node_settings(cfg, {"partition-id": 1})) == ""  # a real node without state-dir
    monkeypatch.setenv(STATE_ROOT_ENV, str(tmp_path / "nodes"))  # what `fedlora simulate` sets
    assert state_dir(node_settings(cfg, {"partition-id": 1})) == str(tmp_path / "nodes" / "partition-1")
    assert state_dir(node_settings(cfg, {"partition-id": 1, "state-dir": "/srv/node"})) == "/srv/node"


def test_a_client_with_persistent_state_disproves_charges_for_rounds_it_did_not_train(tmp_path: Path):
    from flwr.app import Context

    from clients.privacy import ClientPrivacy

    cfg = cfg_for("record")
    first = ServerPrivacy(cfg, tmp_path / "run")
    first.before_dispatch(1, {11: (0, 40)}, run_id="7")
    own = PrivacyLedger("client-0", "record", 1e-5, 1.0, complete=True).record(1, 1.0, 0.2, 5, run="7")
    own.save(tmp_path / "node" / "privacy_ledger.json")  # written before its round-1 reply
    first.observe_reply(11, 0, Reply(own))
    first.round_summary(1)
    checkpoint = first.state_dict()
    first.before_dispatch(2, {11: (0, 40)}, run_id="7")  # the server dies before the client trains
    again = ServerPrivacy(resumed(cfg), tmp_path / "run")
    again.load_state_dict(checkpoint)
    assert again.ledgers["client-0"].pending_rounds == [("7", 2)]
    node_config = {"partition-id": 0, "num-partitions": 4, "state-dir": str(tmp_path / "node")}
    context = Context(run_id=8, node_id=11, node_config=node_config, state=RecordDict(), run_config={})
    copy = again.client_conf(0, 11)["privacy-ledger"]
    priv = ClientPrivacy.for_round(cfg, node_settings(cfg, node_config), context, 40, 5, 2, server_copy=copy)
    assert priv.ledger is not None and priv.ledger.complete and priv.ledger.pending_rounds == []
    again.observe_reply(11, 0, Reply(priv.ledger))  # its complete ledger lacks round 2: not trained
    assert again.ledgers["client-0"].pending_rounds == [] and again.ledgers["client-0"].rounds == [1]


def test_the_server_loop_charges_the_round_lost_in_a_crash_and_stops_at_the_budget(
    tmp_path: Path, task_identity, monkeypatch, capsys
):
    """The real ServerRun on an in-process grid: crash while sending round 2, resume, stop at the budget."""
    import server.loop
    from fedlora.privacy.report import load_report
    from server.loop import ServerRun
    from tests.adversary.fakegrid import FakeGrid, HonestNode, small_config

    monkeypatch.setattr(server.loop, "plot_metrics", lambda *a, **k: None)

    class CrashingGrid(FakeGrid):
        def send_and_receive(self, messages, *, timeout=None):
            messages = list(messages)
            if any(
                m.metadata.message_type == "train" and int(m.content["config"]["round"]) == 2
                for m in messages
            ):
                raise ConnectionError("the server machine lost power")
            return super().send_and_receive(messages, timeout=timeout)

    # q = 1: every node is sent round 2, so the crash always happens (a Poisson round may send nothing).
    two = PrivacyLedger("x", "client", 1e-5, 1.0).record(1, 1.0, 1.0, 1).record(2, 1.0, 1.0, 1)
    target = (two.epsilon("rdp") + two.record(3, 1.0, 1.0, 1).epsilon("rdp")) / 2  # 2 releases fit, 3 do not
    over = {
        "privacy.mode": "client",
        "privacy.noise_multiplier": 1.0,
        "privacy.epsilon": target,
        "privacy.accountant": "rdp",
        "privacy.client_sampling": "poisson",
        "privacy.client_sample_rate": 1.0,
    }
    out = tmp_path / "run"
    nodes = [HonestNode(11 + i, i) for i in range(4)]
    with pytest.raises(ConnectionError):
        ServerRun(CrashingGrid(nodes), small_config(out, **over), out).run()
    cfg = small_config(out, **over, **{"output.resume": True})
    ServerRun(FakeGrid(nodes), cfg, out).run()
    assert "stopping before round 2" in capsys.readouterr().out
    ledger = load_run_file(out)["ledgers"][CLIENT_LEVEL_KEY]
    # Round 1 released; round 2 may have been released before the crash: charged, not redone.
    assert [(e["round"], e.get("pending", False)) for e in ledger["entries"]] == [(1, False), (2, True)]
    report = load_report(out)
    assert "resumed 1 time(s); 1 round(s) in flight" in report["resumed"]
    assert report["clients"][0]["within_budget"] is True and report["clients"][0]["worst_case_rounds"] == [2]
    assert (out / "adapter" / "adapter_model.safetensors").exists()  # the last completed round is exported
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # The in-process nodes report a train loss anyway; under DP the server publishes none.
    assert [r["train_loss"] for r in rows if r["kind"] == "global" and r["round"] >= 1] == [None]
