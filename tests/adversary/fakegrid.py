"""A Grid without Ray or a SuperLink: nodes are Python functions, one of them may be hostile.

:class:`FakeGrid` implements the two calls :class:`server.loop.ServerRun` makes on Flower's
``Grid`` (``get_node_ids`` and ``send_and_receive``), stamping message ids as the SuperLink
does. Honest nodes (:class:`HonestNode`) answer the setup query and send a small, seeded,
deterministic update of exactly the tensors they were sent; a test overrides what one node
replies with a function ``(request Message, honest reply content) -> reply content``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from flwr.app import Message, RecordDict

from fedlora.config import RunConfig, with_overrides
from fedlora.protocol import (
    INFO,
    SetupReply,
    TrainReply,
    TrainRequest,
)

Craft = Callable[[Message, RecordDict], RecordDict | Message]

NUM_EXAMPLES = 40


def small_config(out: Path, **over: object) -> RunConfig:
    """A run small enough for a unit test: 4 nodes, 2 rounds, 8 held-out examples, rank 2."""
    base = {
        "data.num_train": 80,
        "data.num_test": 8,
        "model.max_length": 16,
        "federation.num_clients": 4,
        "federation.num_rounds": 2,
        "federation.node_wait_timeout": 5,
        "lora.rank": 2,
        "output.out_dir": str(out),
    }
    return with_overrides(RunConfig(), {**base, **over})


class HonestNode:
    """A well-behaved node: rank/alpha from the run config, a seeded small update."""

    def __init__(self, node_id: int, partition: int, scale: float = 1e-2) -> None:
        self.node_id, self.partition, self.scale = node_id, partition, scale

    def setup(self, msg: Message) -> RecordDict:
        cfg = RunConfig()  # rank/alpha come from the run config the server sent
        from fedlora.config import from_json
        from fedlora.protocol import SetupQuery

        cfg = from_json(SetupQuery.from_message(msg).run_config)
        rank = cfg.rank_of(self.partition)
        return SetupReply(rank, cfg.lora.alpha_for(rank), NUM_EXAMPLES, self.partition).to_content()

    def train(self, msg: Message) -> RecordDict:
        req = TrainRequest.from_message(msg)
        gen = torch.Generator().manual_seed(1000 * req.round + self.node_id)
        names = [k for k in req.adapter if req.train_a or ".lora_A." not in k]
        update = {k: self.scale * torch.randn(req.adapter[k].shape, generator=gen) for k in sorted(names)}
        metrics = {"train-loss": 1.0 + 0.1 * self.partition, "steps": 2}
        return TrainReply(NUM_EXAMPLES, update, metrics).to_content()


class FakeGrid:
    """In-process stand-in for Flower's ``Grid`` (see module docstring)."""

    def __init__(self, nodes: Iterable[HonestNode], crafted: dict[int, Craft] | None = None) -> None:
        self.nodes = {n.node_id: n for n in nodes}
        self.crafted = dict(crafted or {})
        self.setup_crafted: dict[int, Craft] = {}
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return sorted(self.nodes)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex
            self.sent.append(msg)
            node = self.nodes[msg.metadata.dst_node_id]
            setup = msg.metadata.message_type == "query"
            content = node.setup(msg) if setup else node.train(msg)
            craft = (self.setup_crafted if setup else self.crafted).get(node.node_id)
            if craft is not None:
                content = craft(msg, content)
            reply = content if isinstance(content, Message) else Message(content, reply_to=msg)
            reply.metadata.__dict__["_src_node_id"] = node.node_id
            replies.append(reply)
        return replies


def grid_of(n: int = 4, crafted: dict[int, Craft] | None = None) -> FakeGrid:
    """Return a grid of ``n`` honest nodes with ids 11, 12, ... (partition 0, 1, ...)."""
    return FakeGrid([HonestNode(11 + i, i) for i in range(n)], crafted)


__all__ = ["INFO", "FakeGrid", "HonestNode", "grid_of", "small_config"]
