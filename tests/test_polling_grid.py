"""server.grid.PollingGrid: Flower's push-then-pull ``send_and_receive`` at a short interval."""

from __future__ import annotations

import uuid
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

from server.grid import PollingGrid


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    """Replies are built as a node would build them, inside a task."""
    return task_identity


class SlowGrid:
    """The push/pull half of a grid whose node ``n`` replies only from the ``n``-th pull on."""

    def __init__(self, ready_at: dict[int, int]) -> None:
        self.ready_at, self.pulls, self.pushed = ready_at, 0, {}

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.pushed[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        out = []
        for mid in list(message_ids):
            msg = self.pushed[mid]
            if self.pulls >= self.ready_at[msg.metadata.dst_node_id]:
                content = RecordDict({"c": ConfigRecord({"node": msg.metadata.dst_node_id})})
                out.append(Message(content, reply_to=msg))
        return out


class Recording(PollingGrid):
    def __init__(self, inner: SlowGrid, poll: float) -> None:
        super().__init__(inner, poll)  # type: ignore[arg-type]
        self.events: list[tuple[str, int]] = []

    def on_push(self, messages: list[Message]) -> None:
        self.events.append(("push", len(messages)))

    def on_reply(self, received: int) -> None:
        self.events.append(("reply", received))

    def on_done(self, received: int) -> None:
        self.events.append(("done", received))


def _messages(nodes: Iterable[int]) -> list[Message]:
    return [Message(RecordDict(), dst_node_id=n, message_type="train") for n in nodes]


def test_pulls_until_every_reply_is_in_and_reports_each_arrival():
    inner = SlowGrid({1: 1, 2: 3, 3: 3})
    grid = Recording(inner, poll=0.001)
    replies = list(grid.send_and_receive(_messages([1, 2, 3])))
    assert sorted(int(r.content["c"]["node"]) for r in replies) == [1, 2, 3]
    assert inner.pulls == 3  # stops at the pull that brought the last reply
    assert grid.events == [("push", 3), ("reply", 1), ("reply", 3), ("done", 3)]


def test_timeout_returns_the_replies_received_so_far():
    inner = SlowGrid({1: 1, 2: 10**9})
    grid = Recording(inner, poll=0.001)
    replies = list(grid.send_and_receive(_messages([1, 2]), timeout=0.05))
    assert [int(r.content["c"]["node"]) for r in replies] == [1]
    assert grid.events[-1] == ("done", 1) and inner.pulls >= 2


def test_nothing_to_send_pushes_nothing():
    inner = SlowGrid({})
    grid = Recording(inner, poll=0.001)
    assert list(grid.send_and_receive([])) == []
    assert inner.pulls == 0 and grid.events == []


@pytest.mark.parametrize("poll", [0.0, -1.0, float("nan")])
def test_poll_interval_must_be_positive(poll):
    with pytest.raises(ValueError, match="poll interval must be positive"):
        PollingGrid(SlowGrid({}), poll)  # type: ignore[arg-type]
