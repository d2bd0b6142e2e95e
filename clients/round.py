"""One client round: load the received adapter, train locally, return the update.

The round is written against plain records so it can be called in-process in tests
(``clients.app.app(message, context)``) as well as by Flower's runtimes.
"""

from __future__ import annotations

import logging
import time

import torch
from flwr.app import Context, RecordDict

from clients.node import local_config, local_data
from clients.privacy import ClientPrivacy, bounded_text, covered_metrics
from fedlora.adapters import AdapterState, delta, fingerprint, is_lora_a
from fedlora.data.encode import encode
from fedlora.models import (
    adapter_state,
    get_lora_model,
    init_adapter_state,
    load_adapter_state,
    merged_into_base,
    set_trainable,
    trained_keys,
)
from fedlora.protocol import (
    A_FINGERPRINT,
    BASE_FINGERPRINT,
    ProtocolError,
    TrainReply,
    TrainRequest,
    encode_arrays,
    record_bytes,
)
from fedlora.train import evaluate, planned_steps, resolve_device, train_local

log = logging.getLogger(__name__)


class PayloadError(ValueError):
    """The server's payload does not fit this client (wrong rank, names or shared A)."""


def _start_state(template: AdapterState, received: AdapterState, seed: int, rank: int) -> AdapterState:
    """Seeded initial adapter overwritten by the received tensors (which must fit the template)."""
    start = init_adapter_state(template, seed)
    for k, v in received.items():
        if k not in start:
            raise PayloadError(
                f"server sent tensor {k!r}, which this client's rank-{rank} adapter does not have"
            )
        if start[k].shape != v.shape:
            raise PayloadError(
                f"server sent {k!r} with shape {tuple(v.shape)}; this client's rank-{rank} adapter "
                f"needs {tuple(start[k].shape)}"
            )
        if not torch.isfinite(v).all():
            raise PayloadError(f"server sent non-finite values in {k!r}; refusing to train on them")
        start[k] = v
    return start


MAX_RECEIVED_ABS = 1e3
"""Under record DP the largest magnitude a received adapter or merge value may have."""


def check_received_magnitude(tensors: AdapterState) -> None:
    """Refuse (whatever the data) received values above :data:`MAX_RECEIVED_ABS` under record DP.

    A finite but huge head or factor can overflow one chosen record's logits to inf; the round's
    non-finite-loss error then told the server that record was in the data, without spending
    budget. Trained LoRA factors and heads stay orders of magnitude below the bound, and with it
    every activation of a normalised transformer stays finite in float32.

    Raises
    ------
    PayloadError
        If any value exceeds the bound; the decision depends only on the server's message.
    """
    for name, t in tensors.items():
        peak = float(t.detach().abs().max()) if t.numel() else 0.0
        if not peak <= MAX_RECEIVED_ABS:
            raise PayloadError(
                f"server sent {name!r} with a value of magnitude {peak:.3g}, above {MAX_RECEIVED_ABS:g}: a "
                "record-DP node does not train on such an adapter"
            )


def run_train_round(content: RecordDict, context: Context) -> RecordDict:
    """Run one training round for the message ``content`` and return the reply content."""
    try:
        req = TrainRequest.from_message(content)
    except ProtocolError as err:
        raise PayloadError(f"malformed train request: {err}") from err
    cfg, node = local_config(req.run_config, context.node_config)  # the node's floor and data first
    if cfg.privacy.mode == "record":
        check_received_magnitude({**req.adapter, **(req.merge or {})})
    labels = req.labels
    rank, alpha = req.rank, req.alpha
    if rank != node.rank:
        raise PayloadError(
            f"server sent a rank-{rank} adapter but this node is configured for rank {node.rank}"
        )
    train_a, server_round, seed = req.train_a, req.round, req.seed

    loaded = get_lora_model(
        cfg.model.name,
        cfg.model.task,
        max(2, len(labels)),
        rank,
        alpha,
        cfg.lora.dropout,
        cfg.lora.target_modules,
        quantization=cfg.model.quantization,
        device=node.device,
    )
    start = _start_state(adapter_state(loaded, rank), req.adapter, seed, rank)
    expected_a = req.extras.get(A_FINGERPRINT)
    if expected_a is not None:
        mine = fingerprint({k: v for k, v in start.items() if is_lora_a(k)})
        if mine != str(expected_a):
            raise PayloadError(
                f"shared frozen A fingerprint mismatch (server {expected_a}, client {mine}): "
                "this node derives a "
                "different A; check that server and nodes run the same model, rank and seed"
            )
    merge = req.merge
    expected_base = req.extras.get(BASE_FINGERPRINT)
    if expected_base is not None and fingerprint(merge or {}) != str(expected_base):
        raise PayloadError(
            "base update fingerprint mismatch: the merged base would differ from the server's "
            "(a missing or altered merge record); check that the message reached the node whole"
        )
    load_adapter_state(loaded, rank, start)
    set_trainable(loaded, rank, train_a)

    device = resolve_device(node.device)
    model = loaded.peft.to(device)
    train_records, val_records = local_data(cfg, node, labels)
    steps = planned_steps(len(train_records), cfg.train)
    # The budget decision comes before any work on the records (a declined round costs no encoding time).
    privacy = ClientPrivacy.for_round(
        cfg,
        node,
        context,
        len(train_records),
        steps,
        server_round,
        server_copy=req.privacy_ledger,
    )
    metrics: dict[str, float | int] = {
        "rank": rank,
        "round": server_round,
        "bytes-down": record_bytes(content["adapter"]),
        **privacy.marker(),
    }
    if privacy.enabled:  # bound each record's tokenisation time: it reaches the server as reply latency
        train_records, val_records = bounded_text(train_records, cfg), bounded_text(val_records, cfg)
    if privacy.declined:
        log.warning("client %s declines round %s: %s", node.partition_id, server_round, privacy.reason)
        return TrainReply(
            len(train_records), None, metrics, privacy.ledger_json(), declined_reason=privacy.reason
        ).to_content()
    refuse_cuts = not privacy.enabled  # under DP a refusal would tell the server one record's length
    train_ds = encode(
        train_records, loaded.tokenizer, cfg.model.max_length, cfg.model.task, refuse_cuts=refuse_cuts
    )
    with merged_into_base(loaded, merge):
        try:
            result = train_local(
                model,
                train_ds,
                cfg.train,
                device,
                wrap=privacy.wrap,
                steps=steps,
                seed=seed * 100_003 + server_round * 1009 + node.partition_id,
            )
            privacy.commit(server_round)
        finally:
            privacy.close()
        t_val = time.perf_counter()
        val = (  # a small client may hold no validation records (local_val_fraction rounds down)
            evaluate(
                model,
                encode(
                    val_records,
                    loaded.tokenizer,
                    cfg.model.max_length,
                    cfg.model.task,
                    refuse_cuts=refuse_cuts,
                ),
                cfg.model.task,
                device,
                cfg.train.eval_batch_size,
                trim=True,
            )
            # Under DP local validation scores never leave the node, and its errors and time would
            # follow single records (a server-chosen max_length can cut every response): skip it.
            if val_records and not privacy.enabled
            else None
        )
        val_seconds = time.perf_counter() - t_val
    new = adapter_state(loaded, rank)
    keys = trained_keys(list(new), train_a)
    update = delta({k: new[k] for k in keys}, start)
    record = encode_arrays(update)
    metrics.update(
        {
            "train-loss": result.loss,
            "steps": result.steps,
            "train-seconds": result.seconds,  # the optimiser steps only
            "val-seconds": val_seconds,  # local validation (encoding included)
            "bytes-up": record_bytes(record),
        }
    )
    if val is not None:
        metrics.update({"local-val-loss": val.loss, "local-val-accuracy": val.accuracy})
    metrics.update(privacy.metrics())
    metrics = covered_metrics(cfg, metrics)  # under DP: no un-noised loss or accuracy leaves the node
    ledger = privacy.ledger_json() if privacy.enabled else ""
    return TrainReply(len(train_records), update, metrics, ledger).to_content(record)  # drops NaN metrics
