"""The wire protocol between the ServerApp and the ClientApps: every key, every record, every check.

This is the one module of :mod:`fedlora` that knows Flower's record types: the server
(``server/``) and the clients (``clients/``) build and read messages only through it.

Messages (record names and keys are the constants below):

``query`` (server -> client, once per run): :class:`SetupQuery` -> :class:`SetupReply`
    "config" {``run-config``, ``labels``} -> "info" {``rank``, ``alpha``, ``num-examples``,
    ``partition-id``}.
``train`` (server -> client, every round): :class:`TrainRequest` -> :class:`TrainReply`
    "adapter" (packed ArrayRecord, the tensors the client starts from, PEFT names), optional
    "merge" (factored base update, FLoRA), "config" {``run-config``, ``labels``, ``round``,
    ``rank``, ``alpha``, ``train-a``, ``seed``, ``privacy-ledger``, fingerprints} ->
    "update" (packed ArrayRecord of deltas, trained minus received, of the tensors the client
    trains), "metrics" (``num-examples`` and the client's own metrics), optional "privacy"
    {``ledger``, ``declined-reason``}.

Every array record ("adapter", "merge", "update") is in packed form: one flat float32 buffer
and the manifest of its tensors' names, shapes and offsets (:mod:`fedlora.protocol_arrays`,
re-exported here), so a message is a few Flower objects whatever the adapter's size.

Decoding never trusts the other side: :func:`decode_setup_reply` and
:func:`decode_train_reply` raise :class:`ProtocolError` (one line naming the field and the
value) for anything malformed, and array records are sized, their manifests checked and
their ``.npy`` headers read *before* any array is allocated or split.
Only adapter tensors travel; base weights never do.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedlora.adapters import AdapterState, is_lora_a
from fedlora.protocol_arrays import (
    WIRE_DTYPE,
    ProtocolError,
    decode_arrays,
    encode_arrays,
    manifest_text,
    record_bytes,
    size_cap,
)

# Array codec names, re-exported: server and clients import the whole protocol from here.
__all__ = [
    "DP_MARKER",
    "WIRE_DTYPE",
    "ProtocolError",
    "decode_arrays",
    "encode_arrays",
    "manifest_text",
    "record_bytes",
    "size_cap",
]

# Message types.
QUERY = "query"
TRAIN = "train"
# A reply metric present in every train reply of a round under record-level DP (trained or declined):
# whatever handles the reply after the client (the warm worker) adds no timing to it.
DP_MARKER = "dp-record"
# Record names.
CONFIG, INFO, ADAPTER, MERGE, UPDATE, METRICS, PRIVACY = (
    "config",
    "info",
    "adapter",
    "merge",
    "update",
    "metrics",
    "privacy",
)
# Keys of the "config" and "info" records.
RUN_CONFIG, LABELS, ROUND, RANK, ALPHA = "run-config", "labels", "round", "rank", "alpha"
TRAIN_A, SEED, PRIVACY_LEDGER = "train-a", "seed", "privacy-ledger"
A_FINGERPRINT, BASE_FINGERPRINT = "a-fingerprint", "base-fingerprint"
NUM_EXAMPLES, PARTITION_ID = "num-examples", "partition-id"
# Keys of the "metrics" and "privacy" reply records.
DECLINED, LEDGER, DECLINED_REASON = "declined", "ledger", "declined-reason"
EXTRA_KEYS = (A_FINGERPRINT, BASE_FINGERPRINT)  # strategy extras the client understands

MAX_RANK = 4096  # no LoRA rank above this is plausible on any model fedlora adapts
MAX_EXAMPLES = 10**9
MAX_METRICS = 64  # client metrics kept per reply
METRIC_KEY = re.compile(r"^[a-z][a-z0-9-]{0,47}$")
METRIC_ABS_MAX = 1e15  # a client metric beyond this is a corrupt or hostile report


# --------------------------------------------------------------------------- scalars


def _int(where: str, value: object, lo: int, hi: int) -> int:
    """Return ``value`` as an int in ``lo..hi`` (bools, floats, NaN and inf are refused)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ProtocolError(f"{where} must be an integer, got {value!r}")
    if not lo <= int(value) <= hi:
        raise ProtocolError(f"{where} must be in {lo}..{hi}, got {value!r}")
    return int(value)


def _float(where: str, value: object, lo: float, hi: float, *, strict_lo: bool = False) -> float:
    """Return ``value`` as a finite float in ``[lo, hi]`` (``(lo, hi]`` when ``strict_lo``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ProtocolError(f"{where} must be a number, got {value!r}")
    x = float(value)
    if not math.isfinite(x) or x > hi or x < lo or (strict_lo and x == lo):
        interval = f"{'(' if strict_lo else '['}{lo}, {hi}]"
        raise ProtocolError(f"{where} must be a finite number in {interval}, got {value!r}")
    return x


def printable(text: object, limit: int = 500) -> str:
    """Return ``text`` safe for a console or log line (at most ``limit`` characters).

    Every non-printable character (terminal escapes, carriage returns, bidi overrides) is
    written as its escape.
    Every string a node supplies (an error reason, a declined reason) passes through here
    before it reaches the operator's console or metrics.jsonl: a raw ``ESC[2J`` in a node's
    error reason used to clear the operator's terminal.
    """
    raw = str(text)
    clipped = raw[:limit]
    out = "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in clipped)
    return out + ("..." if len(raw) > limit else "")


def _get(record: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in record:
        raise ProtocolError(f"{where} lacks {key!r}")
    return record[key]


def _content(msg: Message | RecordDict, name: str, kind: str) -> Any:
    """Return record ``name`` of a message's content, checking it exists and has the right kind."""
    if isinstance(msg, Message):
        if msg.has_error():
            raise ProtocolError(f"client error: {printable(msg.error.reason)}")
        content = msg.content
    else:
        content = msg
    group = {
        "config": content.config_records,
        "metrics": content.metric_records,
        "arrays": content.array_records,
    }[kind]
    if name not in group:
        raise ProtocolError(f"message has no {name!r} {kind} record")
    return group[name]


def metrics_key(wire_key: str) -> str:
    """Return the metrics.jsonl spelling of a wire key (one style there: underscores)."""
    return wire_key.replace("-", "_")


def client_metrics(record: Mapping[str, Any]) -> dict[str, int | float]:
    """Return a client's metrics, typed and bounded, keyed in metrics.jsonl style.

    Only scalar ints/floats with lowercase keys are kept; lists, strings, NaN or values
    beyond :data:`METRIC_ABS_MAX` make the reply malformed. The server files the result
    under its own ``client`` key, so nothing a client sends can overwrite the row's
    ``kind``, ``round`` or ``node``.
    """
    if len(record) > MAX_METRICS:
        raise ProtocolError(f"reply carries {len(record)} metrics, more than {MAX_METRICS}")
    out: dict[str, int | float] = {}
    for key, value in record.items():
        if not isinstance(key, str) or not METRIC_KEY.match(key):
            raise ProtocolError(f"metric name {key!r} is not a short lowercase name")
        where = f"metric {key!r}"
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ProtocolError(f"{where} must be a number, got {type(value).__name__}")
        if isinstance(value, int):
            out[metrics_key(key)] = _int(where, value, -int(METRIC_ABS_MAX), int(METRIC_ABS_MAX))
        else:
            out[metrics_key(key)] = _float(where, value, -METRIC_ABS_MAX, METRIC_ABS_MAX)
    return out


# --------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class SetupQuery:
    """Server -> client, once per run: the run configuration and the label set."""

    run_config: str
    labels: tuple[str, ...]

    def to_message(self, node: int) -> Message:
        """Return the query message for ``node``."""
        conf = ConfigRecord({RUN_CONFIG: self.run_config, LABELS: json.dumps(list(self.labels))})
        return Message(RecordDict({CONFIG: conf}), dst_node_id=node, message_type=QUERY)

    @classmethod
    def from_message(cls, msg: Message | RecordDict) -> SetupQuery:
        """Decode a query (client side)."""
        conf = _content(msg, CONFIG, "config")
        return cls(str(_get(conf, RUN_CONFIG, "query")), _labels(conf.get(LABELS, "[]")))


def _labels(text: object) -> tuple[str, ...]:
    try:
        labels = json.loads(str(text))
    except json.JSONDecodeError as err:
        raise ProtocolError(f"labels are not JSON: {err}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
        raise ProtocolError(f"labels must be a JSON list of strings, got {text!r}")
    return tuple(labels)


@dataclass(frozen=True)
class SetupReply:
    """Client -> server: the node's LoRA shape, example count and partition."""

    rank: int
    alpha: float
    num_examples: int
    partition_id: int

    def to_content(self) -> RecordDict:
        """Return the reply content."""
        info = {RANK: self.rank, ALPHA: float(self.alpha), NUM_EXAMPLES: self.num_examples}
        return RecordDict({INFO: ConfigRecord({**info, PARTITION_ID: self.partition_id})})


def decode_setup_reply(msg: Message, *, max_rank: int = MAX_RANK) -> SetupReply:
    """Decode and validate a setup reply; a node whose reply fails is left out of the run.

    Raises
    ------
    ProtocolError
        Missing/zero/string/oversized rank (``max_rank`` is the model's smallest adapted
        dimension), non-finite or non-positive alpha, bad example count or partition id.
    """
    info = _content(msg, INFO, "config")
    rank = _int("setup reply 'rank'", _get(info, RANK, "setup reply"), 1, max_rank)
    alpha = _float("setup reply 'alpha'", _get(info, ALPHA, "setup reply"), 0.0, 1e6, strict_lo=True)
    num = _int("setup reply 'num-examples'", _get(info, NUM_EXAMPLES, "setup reply"), 0, MAX_EXAMPLES)
    pid = _int("setup reply 'partition-id'", _get(info, PARTITION_ID, "setup reply"), 0, 10**9)
    return SetupReply(rank, alpha, num, pid)


# --------------------------------------------------------------------------- train


@dataclass(frozen=True)
class TrainRequest:
    """Server -> client, every round: what to start from and how to train."""

    run_config: str
    labels: tuple[str, ...]
    round: int
    rank: int
    alpha: float
    seed: int
    adapter: AdapterState
    merge: AdapterState | None = None
    train_a: bool = True
    extras: Mapping[str, str] = field(default_factory=dict)
    privacy_ledger: str = ""

    def to_message(self, node: int) -> Message:
        """Return the train message for ``node``."""
        unknown = sorted(set(self.extras) - set(EXTRA_KEYS))
        if unknown:
            raise ProtocolError(f"strategy extras {unknown} are not part of the protocol ({EXTRA_KEYS})")
        conf: dict[str, Any] = {
            RUN_CONFIG: self.run_config,
            LABELS: json.dumps(list(self.labels)),
            ROUND: self.round,
            RANK: self.rank,
            ALPHA: float(self.alpha),
            SEED: self.seed,
            TRAIN_A: self.train_a,
            **{k: str(v) for k, v in self.extras.items()},
        }
        if self.privacy_ledger:
            conf[PRIVACY_LEDGER] = self.privacy_ledger
        content = RecordDict({ADAPTER: encode_arrays(self.adapter), CONFIG: ConfigRecord(conf)})
        if self.merge:
            content[MERGE] = encode_arrays(self.merge)
        return Message(content, dst_node_id=node, message_type=TRAIN)

    @classmethod
    def from_message(cls, msg: Message | RecordDict, *, max_bytes: int = 2**34) -> TrainRequest:
        """Decode a train request or its content (client side); tensors are checked again later."""
        conf = _content(msg, CONFIG, "config")
        content = msg.content if isinstance(msg, Message) else msg
        merge = None
        if MERGE in content.array_records:
            merge = decode_arrays(content[MERGE], max_bytes=max_bytes, what="merge record")
        return cls(
            run_config=str(_get(conf, RUN_CONFIG, "train request")),
            labels=_labels(conf.get(LABELS, "[]")),
            round=_int("round", _get(conf, ROUND, "train request"), 0, 10**9),
            rank=_int("rank", _get(conf, RANK, "train request"), 1, MAX_RANK),
            alpha=_float("alpha", _get(conf, ALPHA, "train request"), 0.0, 1e6, strict_lo=True),
            seed=_int("seed", conf.get(SEED, 0), -(2**63), 2**63 - 1),
            adapter=decode_arrays(
                _content(msg, ADAPTER, "arrays"), max_bytes=max_bytes, what="adapter record"
            ),
            merge=merge,
            train_a=bool(conf.get(TRAIN_A, True)),
            extras={k: str(conf[k]) for k in EXTRA_KEYS if k in conf},
            privacy_ledger=str(conf.get(PRIVACY_LEDGER, "")),
        )


@dataclass(frozen=True)
class TrainReply:
    """Client -> server: the delta of the trained tensors, the example count, metrics, ledger."""

    num_examples: int
    update: AdapterState | None
    metrics: Mapping[str, int | float] = field(default_factory=dict)
    ledger: str = ""
    declined_reason: str = ""
    update_bytes: int = 0

    @property
    def declined(self) -> bool:
        """True when the client sat the round out (its privacy budget would be exceeded)."""
        return self.update is None

    def to_content(self, update_record: ArrayRecord | None = None) -> RecordDict:
        """Return the reply content (wire-style metric keys).

        ``update_record`` is ``encode_arrays(self.update)`` where the caller has it already (the
        client measures its size), so the update is packed once.
        """
        metrics = {NUM_EXAMPLES: self.num_examples, **self.metrics}
        if self.update is None:
            metrics[DECLINED] = 1
        finite = {k: v for k, v in metrics.items() if not isinstance(v, float) or math.isfinite(v)}
        reply = RecordDict({METRICS: MetricRecord(finite)})  # NaN/inf (no validation data) left out
        if self.update is not None:
            reply[UPDATE] = update_record if update_record is not None else encode_arrays(self.update)
        privacy = {LEDGER: self.ledger} if self.ledger else {}
        if self.declined_reason:
            privacy[DECLINED_REASON] = self.declined_reason
        if privacy:
            reply[PRIVACY] = ConfigRecord(privacy)
        return reply


@dataclass(frozen=True)
class UpdateExpectation:
    """What the server accepts as one node's train reply this round."""

    reference: Mapping[str, torch.Tensor]  # tensors the update must hold (names, shapes)
    num_examples: int  # the count the node reported in its setup reply
    max_bytes: int  # cap on the update record, checked before deserialising


def expected_update(adapter: Mapping[str, torch.Tensor], train_a: bool) -> dict[str, torch.Tensor]:
    """Return the tensors a client must send deltas for: all it received, minus A when A is frozen."""
    return {k: v for k, v in adapter.items() if train_a or not is_lora_a(k)}


def decode_train_reply(msg: Message, expect: UpdateExpectation) -> TrainReply:
    """Decode and validate one train reply against what the server sent that node.

    Raises
    ------
    ProtocolError
        Client error; missing/wrongly typed/non-integer/negative/infinite ``num-examples``
        or one differing from the setup reply; metrics that are not bounded numbers; a
        ledger that is not a JSON object; an update record that is oversized, omits or adds
        tensors, has tensors of the wrong dtype or shape, or a malformed manifest.
    """
    metrics_record = _content(msg, METRICS, "metrics")
    num = _int("num-examples", _get(metrics_record, NUM_EXAMPLES, "train reply metrics"), 0, MAX_EXAMPLES)
    metrics = client_metrics(metrics_record)
    if num != expect.num_examples:
        raise ProtocolError(f"num-examples {num} differs from the node's setup reply ({expect.num_examples})")
    ledger, reason = "", ""
    if PRIVACY in msg.content.config_records:
        privacy = msg.content[PRIVACY]
        ledger = str(privacy.get(LEDGER, ""))
        reason = printable(privacy.get(DECLINED_REASON, ""))
        if ledger.strip():
            try:
                parsed = json.loads(ledger)
            except (json.JSONDecodeError, RecursionError) as err:
                raise ProtocolError(f"privacy ledger is not valid JSON: {err}") from None
            if not isinstance(parsed, dict):
                raise ProtocolError(f"privacy ledger must be a JSON object, got {type(parsed).__name__}")
    if metrics_record.get(DECLINED):
        return TrainReply(num, None, metrics, ledger, reason or "declined")
    record = _content(msg, UPDATE, "arrays")
    update = decode_arrays(record, expect.reference, max_bytes=expect.max_bytes, what="update record")
    return TrainReply(num, update, metrics, ledger, "", record_bytes(record))
