"""The fedlora ClientApp: Flower messages in, local LoRA training, adapter deltas out.

Flower glue only: decoding/encoding messages lives in :mod:`fedlora.protocol`, the round
itself in :mod:`clients.round`.

Whatever goes wrong on the node, the server learns only a generic reason (:class:`NodeRefused`:
the request kind and the exception's type); the details, which may quote a private record or
name a local path, go to the node's own log. Before, Flower put ``str(exception)`` in the error
reply, and a server-chosen ``data.label_column = "text"`` made a node quote a record verbatim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from clients.node import local_config, local_data
from clients.worker import round_metrics

log = logging.getLogger(__name__)

app = ClientApp()


class NodeRefused(RuntimeError):
    """What the server sees of a failure on this node: a generic reason (the cause is chained)."""


def _guarded(kind: str, handler: Callable[[], Message]) -> Message:
    """Run ``handler``; on failure log the details here and raise :class:`NodeRefused` (generic)."""
    try:
        return handler()
    except Exception as err:
        log.error("this node refused the %s request: %s", kind, err)
        raise NodeRefused(
            f"the node refused the {kind} request ({type(err).__name__}); the reason is in the node's own log"
        ) from err


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Reply with this node's rank, alpha and number of training examples."""
    from fedlora.protocol import SetupQuery, SetupReply  # imports torch: only when asked

    def answer() -> Message:
        query = SetupQuery.from_message(msg)
        cfg, node = local_config(query.run_config, context.node_config)  # the node's floor and data
        train, _ = local_data(cfg, node, query.labels)
        info = SetupReply(node.rank, float(node.alpha), len(train), node.partition_id)
        return Message(info.to_content(), reply_to=msg)

    return _guarded("setup", answer)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received adapter locally and reply with its update and metrics.

    On a node started with ``fedlora node`` this runs in the node's warm worker process, where
    the base model stays loaded across rounds (see :mod:`clients.worker`).
    """
    from clients.round import run_train_round  # imports torch: only when asked

    return _guarded(
        "train", lambda: Message(round_metrics(run_train_round(msg.content, context)), reply_to=msg)
    )
