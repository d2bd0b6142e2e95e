"""The fedlora ClientApp: Flower messages in, local LoRA training, adapter deltas out.

Flower glue only: decoding/encoding messages lives in :mod:`fedlora.protocol`, the round
itself in :mod:`clients.round`.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.node import local_data, node_settings
from clients.worker import round_metrics
from fedlora.config import from_json

app = ClientApp()


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's rank, alpha and number of training examples."""
    from fedlora.protocol import SetupQuery, SetupReply  # imports torch: only when asked

    query = SetupQuery.from_message(msg)
    cfg = from_json(query.run_config)
    node = node_settings(cfg, context.node_config)
    train, _ = local_data(cfg, node, query.labels)
    info = SetupReply(node.rank, float(node.alpha), len(train), node.partition_id)
    return Message(info.to_content(), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter locally and reply with its update and metrics.

    On a node started with ``fedlora node`` this runs in the node's warm worker process, where
    the base model stays loaded across rounds (see :mod:`clients.worker`).
    """
    from clients.round import run_train_round  # imports torch: only when asked

    return Message(round_metrics(run_train_round(msg.content, context)), reply_to=msg)
