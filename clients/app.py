"""The fedlora ClientApp: Flower messages in, local LoRA training, adapter deltas out.

Flower glue only: decoding/encoding messages lives in :mod:`strategies.wire`, the round
itself in :mod:`clients.round`.
"""

from __future__ import annotations

import json

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.node import local_data, node_settings
from clients.round import run_train_round
from fedlora.config import from_json

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's rank, alpha and number of training examples."""
    cfg = from_json(str(msg.content["config"]["run-config"]))
    node = node_settings(cfg, context.node_config)
    labels = tuple(json.loads(str(msg.content["config"].get("labels", "[]"))))
    train, _ = local_data(cfg, node, labels)
    info = ConfigRecord(
        {
            "rank": node.rank,
            "alpha": float(node.alpha),
            "num-examples": len(train),
            "partition-id": node.partition_id,
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter locally and reply with its update and metrics."""
    return Message(run_train_round(msg.content, context), reply_to=msg)
