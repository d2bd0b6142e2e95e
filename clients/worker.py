"""Hand a ClientApp round to the node's warm worker (:mod:`fedlora.deploy.worker`).

Both ends of the hand-over, in Flower terms:

* :func:`run_round` (the ClientApp's train handler) and :func:`delegate` run in the
  short-lived ``flwr-clientapp`` process. It sends the
  message content and the node's ``Context`` (node config and ``context.state``, which
  holds the privacy ledger) to the worker and copies the state the worker returns back
  into the context, so Flower persists it as if the round had run in-process. It returns
  ``None`` when no worker answers, and the caller trains in-process.
* :func:`handle` runs in the worker. It decodes the request, runs
  :func:`clients.round.run_train_round` (the same code as in-process; the base model is
  cached per process, so it stays loaded across rounds), and tags the reply's metrics
  with ``worker = 1`` and ``worker-rounds`` (rounds this worker process has served).

This module must stay cheap to import: the ClientApp process imports it every round and
the point is not to import torch there.
"""

from __future__ import annotations

import json
import logging
import os
import time

from flwr.app import Context, RecordDict
from flwr.common.serde import context_from_proto, context_to_proto, recorddict_from_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedlora.deploy.worker import SOCKET_ENV, WorkerError, WorkerUnavailable, call

log = logging.getLogger(__name__)

KIND_TRAIN = "train"
_served = {"rounds": 0}


def encode_request(kind: str, content: RecordDict, context: Context) -> list[bytes]:
    """Return the request frames: header, message content, context."""
    return [
        json.dumps({"kind": kind}).encode(),
        recorddict_to_proto(content).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    ]


def delegate(kind: str, content: RecordDict, context: Context) -> RecordDict | None:
    """Run the request on the node's worker; ``None`` if no worker is configured or answers.

    Raises
    ------
    WorkerError
        If the worker ran the round and it failed (as it would have in-process).
    """
    path = os.environ.get(SOCKET_ENV, "")
    if not path:
        return None
    try:
        frames = call(path, encode_request(kind, content, context))
    except WorkerUnavailable as err:
        log.warning("training in-process: %s", err)
        return None
    reply = recorddict_from_proto(ProtoRecordDict.FromString(frames[0]))
    context.state = context_from_proto(ProtoContext.FromString(frames[1])).state
    return reply


def run_round(content: RecordDict, context: Context) -> RecordDict:
    """Run a train round in the node's worker, or here when none answers; return the reply.

    The reply's metrics get ``clientapp-seconds``: from the start of this ClientApp process
    to the reply, so ``clientapp-seconds - train-seconds`` is what the round cost the node
    beyond training (process start, imports, model load, data), with or without a worker.
    """
    reply = delegate(KIND_TRAIN, content, context)
    if reply is None:
        from clients.round import run_train_round

        reply = run_train_round(content, context)
    if "metrics" in reply.metric_records:
        reply.metric_records["metrics"]["clientapp-seconds"] = time.time() - _process_start()
    return reply


def _process_start() -> float:
    """Return this process' start time (seconds since the epoch)."""
    import psutil

    return float(psutil.Process().create_time())


def warm() -> None:
    """Import the training stack once, before the worker accepts its first round."""
    import clients.round  # noqa: F401  (torch, transformers, peft, opacus)


def handle(frames: list[bytes]) -> list[bytes]:
    """Worker side: run one request and return ``[reply content, context]`` frames."""
    from clients.round import run_train_round

    if len(frames) != 3:
        raise WorkerError("ProtocolError", f"expected 3 request frames, got {len(frames)}")
    kind = json.loads(frames[0]).get("kind")
    if kind != KIND_TRAIN:
        raise WorkerError("ProtocolError", f"unknown request kind {kind!r}; this worker runs {KIND_TRAIN!r}")
    content = recorddict_from_proto(ProtoRecordDict.FromString(frames[1]))
    context = context_from_proto(ProtoContext.FromString(frames[2]))
    reply = run_train_round(content, context)
    _served["rounds"] += 1
    if "metrics" in reply.metric_records:
        reply.metric_records["metrics"]["worker"] = 1
        reply.metric_records["metrics"]["worker-rounds"] = _served["rounds"]
    return [recorddict_to_proto(reply).SerializeToString(), context_to_proto(context).SerializeToString()]
