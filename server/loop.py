"""The server's round loop: connect nodes, send payloads, validate and aggregate, checkpoint.

Flower's built-in ``Strategy.start`` sends one model to every client and cannot resume;
fedlora needs per-client payloads (ranks differ), validation before aggregation, and an
atomic checkpoint after every round, so the loop is written here against the ``Grid``.
The math lives in the :class:`strategies.base.LoraStrategy` it drives.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from fedlora.adapters import AdapterError, AdapterState, apply_delta
from fedlora.checkpoint import load_checkpoint, prev_path, save_checkpoint
from fedlora.config import RunConfig
from fedlora.data.sources import load_task_data
from server.evaluator import ServerModel
from server.outputs import RunOutputs, plot_metrics, progress_line
from server.privacy import ServerPrivacy
from strategies.base import ClientResult, ClientSpec, LoraStrategy, Payload
from strategies.registry import create
from strategies.validate import validate_result
from strategies.wire import QUERY, TRAIN, from_record, record_bytes, to_record

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


class FederationError(RuntimeError):
    """The federation cannot proceed (too few nodes, no replies); the message says what to do."""


@dataclass
class NodeInfo:
    """What the server knows about a connected node."""

    spec: ClientSpec
    num_examples: int
    partition_id: int


def wait_for_nodes(grid: Grid, wanted: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Return the ids of ``wanted`` connected nodes, waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes[:wanted] if len(nodes) > wanted else nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {wanted} nodes connected within {timeout:.0f} s; "
                "start more SuperNodes, "
                "or lower federation.num_clients / raise federation.node_wait_timeout"
            )
        time.sleep(poll)


def reply_nodes(msgs: Sequence[Message], replies: Sequence[Message]) -> list[int]:
    """Return the node each reply answers for, matched through the message it replies to.

    ``src_node_id`` is not enough: when a node stops sending heartbeats, the SuperLink
    answers in its place with an error reply whose source is the SuperLink itself (id 1).
    """
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    return [sent.get(r.metadata.reply_to_message_id, r.metadata.src_node_id) for r in replies]


def query_nodes(
    grid: Grid, nodes: Sequence[int], cfg: RunConfig, labels: Sequence[str]
) -> dict[int, NodeInfo]:
    """Ask every node for its rank, alpha and example count; nodes that fail are left out."""
    content = ConfigRecord({"run-config": cfg.to_json(), "labels": json.dumps(list(labels))})
    msgs = [Message(RecordDict({"config": content}), dst_node_id=n, message_type=QUERY) for n in nodes]
    infos: dict[int, NodeInfo] = {}
    replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.round_timeout))
    for src, reply in zip(reply_nodes(msgs, replies), replies, strict=True):
        if reply.has_error():
            log.warning("node %s failed its query and is left out: %s", src, reply.error.reason)
            continue
        info = reply.content["info"]
        spec = ClientSpec(node_id=src, rank=int(info["rank"]), alpha=float(info["alpha"]))
        infos[src] = NodeInfo(spec, int(info["num-examples"]), int(info["partition-id"]))
    if not infos:
        raise FederationError("no node answered the setup query; check the SuperNode logs")
    return infos


def _train_message(
    node: int, payload: Payload, base_conf: Mapping[str, Any], spec: ClientSpec, rnd: int
) -> Message:
    conf = ConfigRecord(
        {
            **base_conf,
            "round": rnd,
            "rank": spec.rank,
            "alpha": float(spec.alpha),
            "train-a": payload.train_a,
            "fresh-adapter": payload.fresh_adapter,
            **dict(payload.extras),
        }
    )
    content = RecordDict({"adapter": to_record(payload.adapter), "config": conf})
    if payload.merge:
        content["merge"] = to_record(payload.merge)
    return Message(content, dst_node_id=node, message_type=TRAIN)


class ServerRun:
    """One federated run driven by the server (see module docstring)."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path) -> None:
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        self.out = RunOutputs(run_dir, cfg, resume=cfg.output.resume)
        data = load_task_data(cfg.data, cfg.model.task)
        self.labels = data.labels
        self.model = ServerModel(cfg, data.labels, data.test)
        self.strategy: LoraStrategy = create(cfg.federation.strategy, **dict(cfg.federation.strategy_params))
        self.privacy = ServerPrivacy(cfg, run_dir)
        self.rng = random.Random(cfg.federation.seed)
        self.max_rank = cfg.max_rank()

    def _checkpoint(self, rnd: int, state: AdapterState) -> None:
        save_checkpoint(
            self.run_dir / CHECKPOINT,
            {
                "round": rnd,
                "state": state,
                "strategy": self.strategy.state_dict(),
                "privacy": self.privacy.state_dict(),
                "rng": self.rng.getstate(),
                "config": self.cfg.to_json(),
            },
        )

    def _resume(self) -> tuple[int, AdapterState] | None:
        path = self.run_dir / CHECKPOINT
        if not self.cfg.output.resume:
            return None
        if not (path.exists() or prev_path(path).exists()):
            # Crashed before the first checkpoint: start over, dropping the partial metrics.
            self.out.truncate_after(-1)
            print(f"no checkpoint in {self.run_dir}; starting the run from round 1", flush=True)
            return None
        ckpt = load_checkpoint(path)
        self.strategy.load_state_dict(ckpt["strategy"])
        self.privacy.load_state_dict(ckpt["privacy"])
        self.rng.setstate(ckpt["rng"])
        self.out.truncate_after(int(ckpt["round"]))
        print(f"resuming {self.run_dir} after round {ckpt['round']}", flush=True)
        return int(ckpt["round"]), ckpt["state"]

    def run(self) -> dict[str, Any]:
        """Run all rounds; return the final global metrics record."""
        cfg = self.cfg
        nodes = wait_for_nodes(self.grid, cfg.federation.num_clients, cfg.federation.node_wait_timeout)
        infos = query_nodes(self.grid, nodes, cfg, self.labels)
        specs = [i.spec for i in infos.values()]
        max_rank = self.max_rank = max(s.rank for s in specs)
        resumed = self._resume()
        if resumed is None:
            start_round = 1
            state = self.strategy.init_state(self.model.template(max_rank, cfg.federation.seed), specs)
            self._record_global(0, state, [], [], 0, 0, 0.0, len(nodes))
        else:
            start_round, state = resumed[0] + 1, resumed[1]
        last: dict[str, Any] = {}
        for rnd in range(start_round, cfg.federation.num_rounds + 1):
            state, last = self._round(rnd, state, infos)
            self._checkpoint(rnd, state)
        self._finish(state)
        return last

    def _sample(self, infos: Mapping[int, NodeInfo]) -> tuple[list[int], list[int]]:
        """Return (nodes sampled this round, known nodes no longer connected).

        A SuperNode that died is not waited for again; it rejoins the pool if it reconnects.
        """
        online = set(self.grid.get_node_ids())
        nodes = sorted(n for n in infos if n in online)
        offline = sorted(n for n in infos if n not in online)
        if offline:
            log.warning("%d of %d nodes are no longer connected: %s", len(offline), len(infos), offline)
        k = self.cfg.federation.clients_per_round
        return self.privacy.sample_clients(nodes, k, self.rng), offline

    def _round(
        self, rnd: int, state: AdapterState, infos: Mapping[int, NodeInfo]
    ) -> tuple[AdapterState, dict[str, Any]]:
        t0 = time.perf_counter()
        selected, offline = self._sample(infos)
        base_conf = {
            "run-config": self.cfg.to_json(),
            "labels": json.dumps(list(self.labels)),
            "seed": self.cfg.federation.seed,
        }
        payloads = {n: self.strategy.payload(state, infos[n].spec) for n in selected}
        msgs = [
            _train_message(
                n,
                payloads[n],
                {**base_conf, **self.privacy.client_conf(infos[n].partition_id)},
                infos[n].spec,
                rnd,
            )
            for n in selected
        ]
        bytes_down = sum(
            record_bytes(m.content["adapter"]) + record_bytes(m.content.array_records.get("merge"))
            for m in msgs
        )
        replies = (
            list(self.grid.send_and_receive(msgs, timeout=self.cfg.federation.round_timeout)) if msgs else []
        )
        results, rejected, client_rows, bytes_up = [], [], [], 0
        replied = reply_nodes(msgs, replies)
        for node, reply in zip(replied, replies, strict=True):
            if reply.has_error():
                rejected.append({"node": node, "reason": f"client error: {reply.error.reason}"})
                continue
            metrics = dict(reply.content["metrics"]) if "metrics" in reply.content.metric_records else {}
            client_rows.append(
                {
                    "kind": "client",
                    "round": rnd,
                    "node": node,
                    "partition": infos[node].partition_id,
                    **metrics,
                }
            )
            self.privacy.observe_reply(node, infos[node].partition_id, reply)
            if metrics.get("declined"):
                rejected.append({"node": node, "reason": "declined: privacy budget exhausted"})
                continue
            reason, result = self._decode(reply, payloads[node], infos[node])
            if result is None:
                rejected.append({"node": node, "reason": reason})
                continue
            bytes_up += record_bytes(reply.content["update"])
            results.append(result)
        missing = set(selected) - set(replied)
        rejected += [{"node": n, "reason": "no reply before the round timeout"} for n in sorted(missing)]
        rejected += [{"node": n, "reason": "node disconnected before the round"} for n in offline]
        for r in rejected:
            log.warning("round %s: update of node %s excluded: %s", rnd, r["node"], r["reason"])
        if len(results) >= self.cfg.federation.min_replies:
            results = self.privacy.process_updates(results, payloads, rnd)
            state = self.strategy.aggregate(state, results)
        else:
            print(
                f"round {rnd}: only {len(results)} valid updates "
                f"(< min_replies = {self.cfg.federation.min_replies}); "
                "global adapter unchanged",
                flush=True,
            )
        for row in client_rows:
            self.out.log(row)
        train_losses = [
            (r.num_examples, float(row.get("train-loss", 0.0)))
            for r, row in zip(
                results,
                [next(c for c in client_rows if c["node"] == r.spec.node_id) for r in results],
                strict=True,
            )
        ]
        rec = self._record_global(
            rnd,
            state,
            results,
            rejected,
            bytes_up,
            bytes_down,
            time.perf_counter() - t0,
            len(selected),
            train_losses,
        )
        return state, rec

    def _decode(self, reply: Message, payload: Payload, info: NodeInfo) -> tuple[str, ClientResult | None]:
        if "update" not in reply.content.array_records:
            return "reply has no 'update' record", None
        try:
            upd = from_record(reply.content["update"])
            num = int(reply.content["metrics"]["num-examples"])
        except (KeyError, TypeError, ValueError) as err:
            return f"malformed reply: {err}", None
        try:
            full = apply_delta(payload.adapter, upd)
        except AdapterError as err:
            return f"update does not fit the payload: {err}", None
        result = ClientResult(spec=info.spec, num_examples=num, state=full)
        reason = validate_result(payload.adapter, result, info.spec)
        return (reason, None) if reason is not None else ("", result)

    def _global_view(self, state: AdapterState) -> tuple[AdapterState, AdapterState | None]:
        """Return the adapter (at the largest client rank) and base merge the server evaluates and exports."""
        spec = ClientSpec(node_id=0, rank=self.max_rank, alpha=self.cfg.lora.alpha_for(self.max_rank))
        return self.strategy.final_adapter(state, spec), self.strategy.final_merge(state)

    def _record_global(
        self,
        rnd: int,
        state: AdapterState,
        results: Sequence[ClientResult],
        rejected: list[dict[str, Any]],
        bytes_up: int,
        bytes_down: int,
        seconds: float,
        sampled: int,
        train_losses: Sequence[tuple[int, float]] = (),
    ) -> dict[str, Any]:
        adapter, merge = self._global_view(state)
        ev = self.model.evaluate(adapter, merge)
        n = sum(w for w, _ in train_losses)
        rec = {
            "kind": "global",
            "round": rnd,
            "test_accuracy": ev.accuracy,
            "test_loss": ev.loss,
            "train_loss": (sum(w * loss for w, loss in train_losses) / n) if n else None,
            "clients_sampled": sampled,
            "clients_ok": len(results),
            "rejected": rejected,
            "bytes_up": bytes_up,
            "bytes_down": bytes_down,
            "seconds": seconds,
            **self.privacy.round_summary(rnd),
        }
        self.out.log(rec)
        print(progress_line(rec, self.cfg.federation.num_rounds), flush=True)
        return rec

    def _finish(self, state: AdapterState) -> None:
        adapter, merge = self._global_view(state)
        self.model.export(self.run_dir / "adapter", adapter, merge)
        plot_metrics(self.out.metrics_path, self.run_dir / "metrics.png")
        self.privacy.write_report()
