"""The plain Flower baseline as a deployable Flower App, with a meter on its ServerApp's grid.

:mod:`experiments.baseline_deploy` copies this module and :mod:`~experiments.baselines.plain_flower`
into one package of a temporary app directory whose ``pyproject.toml`` names
``server_app`` and ``client_app`` below as the app's components; ``flwr run`` bundles it, the
SuperLink's ``flwr-serverapp`` and every SuperNode's ``flwr-clientapp`` import it from the bundle
(hence the relative import). The ClientApp is the baseline's own, unchanged: a fresh
``flwr-clientapp`` process per message rebuilds the model, as Flower's examples do. Both sides
read the run config from the JSON file named by ``FEDLORA_BASELINE_CONFIG``
(:data:`~experiments.baselines.plain_flower.CONFIG_ENV`), set in every process of the deployment.

The ServerApp is :func:`~experiments.baselines.plain_flower.run_fedavg` on a :class:`TimedGrid`:
for every ``send_and_receive`` it records the message type, wall-clock start and end
(``time.time()``, so the benchmark can line them up with other processes), the arrays' bytes
both ways and each reply's metrics; the central evaluation records when it ended. With run
config ``reply-poll = 0`` (default) replies are pulled by Flower's own grid (every 3 s, as a
plain Flower app does); ``reply-poll > 0`` pulls every that many seconds (fedlora's
:class:`server.grid.PollingGrid`), to separate the polling from the rest. At the end the
records go as JSON to the run config's ``meter-file``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedlora.protocol_arrays import record_bytes
from server.grid import PollingGrid

from . import plain_flower


def message_bytes(msg: Message) -> int:
    """Return the bytes of every array record in ``msg`` (0 for an error reply)."""
    if msg.has_error():
        return 0
    return sum(record_bytes(rec) for rec in msg.content.array_records.values())


def reply_metrics(msg: Message) -> dict[str, float]:
    """Return the numeric metrics of a reply's ``metrics`` record (empty if none)."""
    if msg.has_error() or "metrics" not in msg.content.metric_records:
        return {}
    return {
        k: float(v) for k, v in msg.content.metric_records["metrics"].items() if isinstance(v, int | float)
    }


def call_record(msgs: list[Message], replies: list[Message]) -> dict[str, Any]:
    """Return what a metering grid records of one ``send_and_receive``: type, counts, bytes, metrics."""
    return {
        "type": msgs[0].metadata.message_type if msgs else "",
        "messages": len(msgs),
        "replies": len(replies),
        "errors": sum(m.has_error() for m in replies),
        "bytes_down": sum(message_bytes(m) for m in msgs),
        "bytes_up": sum(message_bytes(m) for m in replies),
        "metrics": [{"node": m.metadata.src_node_id, **reply_metrics(m)} for m in replies],
    }


class TimedGrid(PollingGrid):
    """A grid recording every ``send_and_receive`` in ``calls`` (see the module docstring).

    ``poll = None`` sends through the wrapped grid's own ``send_and_receive`` (Flower's 3 s
    reply pull); a number pulls every ``poll`` seconds (:class:`server.grid.PollingGrid`).
    """

    def __init__(self, inner: Grid, poll: float | None = None) -> None:
        super().__init__(inner, poll if poll else 0.1)
        self.own_polling = bool(poll)
        self.calls: list[dict[str, Any]] = []

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Send, wait for the replies (Flower's or this grid's polling) and record the call."""
        msgs = list(messages)
        t0 = time.time()
        if self.own_polling:
            replies = list(super().send_and_receive(msgs, timeout=timeout))
        else:
            replies = list(self.inner.send_and_receive(msgs, timeout=timeout))
        self.calls.append({**call_record(msgs, replies), "start": t0, "end": time.time()})
        return replies


client_app = plain_flower.client_app  # a plain assignment: Flower finds components by AST
server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the baseline's FedAvg on a :class:`TimedGrid`; write the records to ``meter-file``."""
    poll = float(context.run_config.get("reply-poll", 0.0) or 0.0)
    out = str(context.run_config.get("meter-file", "") or "")
    if not out:
        raise ValueError("run config meter-file is empty: give the path the meter's JSON goes to")
    timed = TimedGrid(grid, poll or None)
    evaluations: list[dict[str, float]] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        start = time.time()
        res = plain_flower.evaluate_global(server_round, arrays)
        evaluations.append(
            {"round": server_round, "start": start, "end": time.time(), "accuracy": float(res["accuracy"])}
        )
        return res

    try:
        plain_flower.run_fedavg(timed, context, evaluate_fn=evaluate)
    finally:
        record = {"reply_poll": poll, "calls": timed.calls, "evaluations": evaluations}
        Path(out).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
