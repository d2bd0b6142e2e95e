"""The wire protocol round-trips its records, and the round's pure step turns replies into an outcome."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message

from fedlora.protocol import (
    A_FINGERPRINT,
    BASE_FINGERPRINT,
    ProtocolError,
    SetupQuery,
    SetupReply,
    TrainReply,
    TrainRequest,
    UpdateExpectation,
    decode_setup_reply,
    decode_train_reply,
    expected_update,
    size_cap,
)
from server.round import collect_replies
from strategies.base import ClientSpec, Payload

A, B, H = "m.lora_A.weight", "m.lora_B.weight", "head.weight"
ADAPTER = {A: torch.ones(2, 3), B: torch.zeros(4, 2), H: torch.ones(2)}


@pytest.fixture(autouse=True)
def _identity(task_identity):
    return task_identity


def test_the_strategies_fingerprint_keys_are_the_protocols():
    from strategies.ffa import FINGERPRINT_KEY as FFA_KEY
    from strategies.flora import FINGERPRINT_KEY as FLORA_KEY

    assert (FFA_KEY, FLORA_KEY) == (A_FINGERPRINT, BASE_FINGERPRINT)


def test_train_request_round_trip():
    req = TrainRequest(
        "{}",
        ("a", "b"),
        3,
        2,
        4.0,
        7,
        ADAPTER,
        {A: torch.ones(1, 3), B: torch.ones(4, 1)},
        train_a=False,
        extras={A_FINGERPRINT: "ab"},
        privacy_ledger='{"x": 1}',
    )
    back = TrainRequest.from_message(req.to_message(5))
    assert (back.round, back.rank, back.alpha, back.seed, back.train_a) == (3, 2, 4.0, 7, False)
    assert (
        back.labels == ("a", "b")
        and back.extras == {A_FINGERPRINT: "ab"}
        and back.privacy_ledger == '{"x": 1}'
    )
    assert all(torch.equal(back.adapter[k], ADAPTER[k]) for k in ADAPTER) and back.merge is not None
    with pytest.raises(ProtocolError, match="not part of the protocol"):
        TrainRequest("{}", (), 1, 2, 4.0, 0, ADAPTER, extras={"fresh-adapter": "1"}).to_message(5)


def test_setup_and_train_reply_round_trip():
    query = SetupQuery("{}", ("x",)).to_message(5)
    setup = decode_setup_reply(Message(SetupReply(2, 4.0, 40, 1).to_content(), reply_to=query))
    assert setup == SetupReply(2, 4.0, 40, 1)
    want = expected_update(ADAPTER, train_a=False)
    assert sorted(want) == [H, B]
    sent = TrainReply(40, {k: torch.full_like(v, 0.5) for k, v in want.items()}, {"train-loss": 0.25})
    got = decode_train_reply(
        Message(sent.to_content(), reply_to=query), UpdateExpectation(want, 40, size_cap(want, 1.5))
    )
    assert got.metrics == {"num_examples": 40, "train_loss": 0.25} and got.update_bytes > 0
    assert all(torch.equal(got.update[k], sent.update[k]) for k in want)


def test_collect_replies_without_flower_runtime():
    query = SetupQuery("{}", ()).to_message(5)
    specs = {n: ClientSpec(n, 2, 4.0) for n in (1, 2, 3)}
    sent = {n: Payload(adapter=ADAPTER) for n in specs}
    good = TrainReply(40, {k: torch.full_like(v, 0.1) for k, v in ADAPTER.items()}, {"train-loss": 2.0})
    liar = TrainReply(41, good.update, {})
    replies = [
        (1, Message(good.to_content(), reply_to=query)),
        (2, Message(liar.to_content(), reply_to=query)),
    ]
    out = collect_replies(4, sent, replies, specs, {1: 40, 2: 40, 3: 40}, {1: 0, 2: 1, 3: 2})
    assert [r.spec.node_id for r in out.results] == [1] and out.train_losses == [(40, 2.0)]
    assert torch.allclose(out.results[0].state[A], ADAPTER[A] + 0.1)
    assert {r["node"]: r["reason"].split(":")[0] for r in out.rejected} == {
        2: "malformed reply",
        3: "no reply before the round timeout",
    }
    assert [row["node"] for row in out.client_rows] == [1] and out.client_rows[0]["round"] == 4
