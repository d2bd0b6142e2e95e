"""One round's replies -> :class:`RoundOutcome`: decode, validate, bound, without Flower's Grid.

:func:`collect_replies` is the pure step between "messages came back" and "aggregate": every
reply is decoded at the protocol boundary (:mod:`fedlora.protocol`), rebuilt into a
:class:`~strategies.base.ClientResult`, validated (:mod:`strategies.validate`) and, if any of
that fails, recorded under ``rejected`` with the reason; a bad reply never raises.
:func:`robust_results` then applies the robustness defences of :mod:`strategies.robust`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flwr.app import Message

from fedlora.adapters import AdapterError, apply_delta
from fedlora.config import RobustConfig
from fedlora.protocol import (
    ProtocolError,
    UpdateExpectation,
    decode_train_reply,
    expected_update,
    printable,
    size_cap,
)
from strategies.base import ClientResult, ClientSpec, Payload
from strategies.robust import bound_updates, cap_example_counts
from strategies.validate import validate_result


@dataclass
class RoundOutcome:
    """What a round's replies amount to, before aggregation."""

    results: list[ClientResult] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    clipped: list[dict[str, Any]] = field(default_factory=list)
    client_rows: list[dict[str, Any]] = field(default_factory=list)
    train_losses: list[tuple[int, float]] = field(default_factory=list)
    bytes_up: int = 0

    def reject(self, node: int, reason: str) -> None:
        """Record that ``node``'s update is excluded this round, and why (made printable: it may quote it)."""
        self.rejected.append({"node": node, "reason": printable(reason, 2000)})


def expectation(payload: Payload, num_examples: int, size_factor: float) -> UpdateExpectation:
    """Return what the server accepts back from a node that received ``payload``."""
    reference = expected_update(payload.adapter, payload.train_a)
    return UpdateExpectation(reference, num_examples, size_cap(reference, size_factor))


def collect_replies(
    rnd: int,
    sent: Mapping[int, Payload],
    replies: Sequence[tuple[int, Message]],
    specs: Mapping[int, ClientSpec],
    setup_counts: Mapping[int, int],
    partitions: Mapping[int, int],
    *,
    size_factor: float = 1.0,
    observe: Callable[[int, Message], None] | None = None,
) -> RoundOutcome:
    """Turn ``(node, reply)`` pairs into results and reasoned rejections (pure but for ``observe``).

    Parameters
    ----------
    rnd
        The round number (for client rows).
    sent
        Per node, the payload it was sent.
    replies
        ``(node, message)`` per reply received; replies from nodes not in ``sent`` are dropped.
    specs, setup_counts, partitions
        Per node: its spec, the example count of its setup reply, its partition id.
    size_factor
        Update records above ``size_factor x`` their expected size are refused unread.
    observe
        Called with each decoded reply that carries a privacy ledger (record-level DP
        bookkeeping); a ``ValueError``/``KeyError``/``TypeError`` from it rejects the reply.
    """
    out = RoundOutcome()
    seen: set[int] = set()
    for node, msg in replies:
        if node not in sent or node in seen:
            continue
        seen.add(node)
        try:
            reply = decode_train_reply(msg, expectation(sent[node], setup_counts[node], size_factor))
        except ProtocolError as err:
            text = str(err)
            out.reject(node, text if text.startswith("client error") else f"malformed reply: {text}")
            continue
        out.client_rows.append(
            {
                "kind": "client",
                "round": rnd,
                "node": node,
                "partition": partitions[node],
                "client": dict(reply.metrics),
            }
        )
        if reply.ledger and observe is not None:
            try:
                observe(node, msg)
            except (ValueError, KeyError, TypeError) as err:
                out.reject(node, f"malformed privacy ledger: {err}")
                continue
        if reply.declined:
            out.reject(node, f"declined: {reply.declined_reason or 'privacy budget exhausted'}")
            continue
        assert reply.update is not None  # not declined
        try:
            full = apply_delta(sent[node].adapter, reply.update)
        except AdapterError as err:
            out.reject(node, f"update does not fit the payload: {err}")
            continue
        result = ClientResult(spec=specs[node], num_examples=reply.num_examples, state=full)
        reason = validate_result(sent[node].adapter, result, specs[node])
        if reason is not None:
            out.reject(node, reason)
            continue
        out.results.append(result)
        out.bytes_up += reply.update_bytes
        loss = reply.metrics.get("train_loss")
        out.train_losses.append((reply.num_examples, float(loss) if loss is not None else math.nan))
    for node in sorted(set(sent) - seen):
        out.reject(node, "no reply before the round timeout")
    return out


def robust_results(
    out: RoundOutcome, sent: Mapping[int, Payload], robust: RobustConfig, *, relative: bool = True
) -> RoundOutcome:
    """Apply norm bounding and example-count capping to ``out.results`` (recorded in ``out``).

    ``relative=False`` keeps only the defences that look at a client's own update (the
    absolute caps ``max_update_norm`` and ``max_abs_value``) and drops those relative to the
    round's median (the norm bound, the weight cap). Client-level DP needs that: a bound that
    moves with the other clients' updates lets adding one client rescale everyone else's
    update before the DP clip, so the release's sensitivity is no longer ``C``.
    """
    bounded = bound_updates(
        out.results,
        {n: p.adapter for n, p in sent.items()},
        bound=robust.norm_bound if relative else 0.0,
        max_norm=robust.max_update_norm,
        max_abs=robust.max_abs_value,
    )
    for r in bounded.rejected:
        out.reject(int(r["node"]), str(r["reason"]))  # type: ignore[call-overload]
    gone = {int(r["node"]) for r in bounded.rejected}  # type: ignore[call-overload]
    pairs = zip(out.results, out.train_losses, strict=True)
    out.train_losses = [tl for r, tl in pairs if r.spec.node_id not in gone]
    out.results = cap_example_counts(bounded.results, robust.max_weight_factor if relative else 0.0)
    out.clipped = bounded.clipped
    return out
