"""The server's round loop: connect nodes, send payloads, validate and aggregate, checkpoint.

Flower's built-in ``Strategy.start`` sends one model to every client and cannot resume;
fedlora needs per-client payloads (ranks differ), validation before aggregation, and an
atomic checkpoint after every round, so the loop is written here against the ``Grid``.
The math lives in the :class:`strategies.base.LoraStrategy` it drives.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from fedlora.adapters import AdapterState, is_lora_a, is_lora_b
from fedlora.atomic import owned_dir, private_tree
from fedlora.checkpoint import load_checkpoint, prev_path, save_checkpoint
from fedlora.config import OutputConfig, RunConfig
from fedlora.data.cached import task_data
from fedlora.derive import derive_config
from fedlora.protocol import (
    ProtocolError,
    SetupQuery,
    SetupReply,
    TrainRequest,
    decode_setup_reply,
    printable,
    record_bytes,
)
from server.admission import admit
from server.checks import check_resumable, small_federation_warning, summary_loss
from server.evaluator import ServerModel
from server.outputs import RoundRecord, RunOutputs, plot_metrics, progress_line
from server.privacy import ServerPrivacy, grid_run_id
from server.resume import config_changes
from server.round import RoundOutcome, collect_replies, robust_results
from strategies.base import ClientSpec, LoraStrategy, Payload
from strategies.campaign import campaign_wrapped
from strategies.registry import create
from strategies.robust import (
    RobustCenter,
    aggregate_checked,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"


UNATTRIBUTED = -1  # reply_nodes: a reply that answers for no node
SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID: the SuperLink's own error replies


class FederationError(RuntimeError):
    """The federation cannot proceed (too few nodes, no replies); the message says what to do."""


@dataclass
class NodeInfo:
    """What the server knows about a connected node."""

    spec: ClientSpec
    num_examples: int
    partition_id: int


def wait_for_nodes(
    grid: Grid, wanted: int, timeout: float, poll: float = 1.0, *, keep_all: bool = False
) -> list[int]:
    """Return the ids of ``wanted`` connected nodes (all with ``keep_all``), waiting up to ``timeout`` s.

    ``keep_all`` is for client-level DP: choosing ``wanted`` of more connected nodes by id lets one
    added node push another out, so a neighbouring federation would differ in two clients.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= wanted:
            return nodes[:wanted] if len(nodes) > wanted and not keep_all else nodes
        if time.monotonic() > deadline:
            raise FederationError(
                f"only {len(nodes)} of {wanted} nodes connected within {timeout:.0f} s; "
                "start more SuperNodes, "
                "or lower federation.num_clients / raise federation.node_wait_timeout"
            )
        time.sleep(poll)


def reply_nodes(msgs: Sequence[Message], replies: Sequence[Message]) -> list[int]:
    """Return the node each reply answers for, or :data:`UNATTRIBUTED` for a reply nobody was asked for.

    A reply counts for node ``n`` only when it answers a message sent to ``n`` (``reply_to``)
    AND its sender is ``n``, or it is an error reply from the SuperLink itself (id 1), which
    answers in place of a node that stopped sending heartbeats. A reply that names another
    node's message (or none) is attributed to nobody, so it cannot stand in for that node.
    """
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs}
    out = []
    for r in replies:
        node = sent.get(r.metadata.reply_to_message_id, UNATTRIBUTED)
        src = r.metadata.src_node_id
        superlink_error = src == SUPERLINK_NODE_ID and r.has_error()
        out.append(node if src == node or superlink_error else UNATTRIBUTED)
    return out


def derived_timeout(slowest: float) -> float | None:
    """Return the round timeout when none is set: no limit until a round completed, then 10x the slowest."""
    return max(300.0, 10.0 * slowest) if slowest > 0 else None


def query_nodes(
    grid: Grid,
    nodes: Sequence[int],
    cfg: RunConfig,
    labels: Sequence[str],
    *,
    max_rank: int,
    shared_partitions_left_out: bool = True,
) -> tuple[dict[int, NodeInfo], list[dict[str, Any]]]:
    """Ask every node for its rank, alpha and example count.

    Returns the nodes that answered well and, for each node left out, ``{"node", "reason"}``
    (an error, a malformed reply, a rank above ``max_rank``, the model's smallest adapted
    dimension, or a reply :func:`server.admission.admit` finds inconsistent with the run).
    """
    query = SetupQuery(cfg.to_json(), tuple(labels))
    msgs = [query.to_message(n) for n in nodes]
    infos: dict[int, NodeInfo] = {}
    left_out: list[dict[str, Any]] = []
    replies = list(grid.send_and_receive(msgs, timeout=cfg.federation.round_timeout or None))
    decoded: dict[int, SetupReply] = {}
    for src, reply in zip(reply_nodes(msgs, replies), replies, strict=True):
        if src not in nodes or src in decoded:
            continue
        try:
            decoded[src] = decode_setup_reply(reply, max_rank=max_rank)
        except ProtocolError as err:
            left_out.append({"node": src, "reason": printable(f"setup reply refused: {err}", 2000)})
    # valid but not this run's shape, or (unless client-level DP admits every node) a shared partition
    admitted, inconsistent = admit(decoded, cfg, shared_partitions_left_out=shared_partitions_left_out)
    left_out += inconsistent
    for row in left_out:
        log.warning("node %s is left out of the run: %s", row["node"], row["reason"])
    for src, info in admitted.items():
        spec = ClientSpec(node_id=src, rank=info.rank, alpha=info.alpha)
        infos[src] = NodeInfo(spec, info.num_examples, info.partition_id)
    if not infos:
        reasons = "; ".join(f"node {r['node']}: {r['reason']}" for r in left_out) or "no replies"
        raise FederationError(
            f"no node answered the setup query usably ({reasons}); check the SuperNode logs"
        )
    return infos, left_out


def build_strategy(cfg: RunConfig) -> LoraStrategy:
    """Create the run's strategy, wrapped in a robust centre when ``robust.aggregator`` asks for one."""
    strategy = create(cfg.federation.strategy, **dict(cfg.federation.strategy_params))
    if cfg.robust.aggregator != "mean":
        try:
            strategy = RobustCenter(strategy, cfg.robust.aggregator, cfg.robust.trim_fraction)
        except ValueError as err:
            raise FederationError(f"robust.aggregator: {err}") from err
    try:
        return campaign_wrapped(strategy, cfg)  # a bound across rounds (strategies/campaign.py)
    except ValueError as err:
        raise FederationError(f"robust.campaign_bound: {err}") from err


def is_eval_round(rnd: int, num_rounds: int, output: OutputConfig) -> bool:
    """Return whether the server scores the global adapter after round ``rnd`` (0: the initial one).

    Round 0 when ``output.eval_initial``; then every ``output.eval_every``-th round and always
    the last (``num_rounds``), so a run ends with a score whatever K is.
    """
    if rnd <= 0:
        return output.eval_initial
    return rnd % output.eval_every == 0 or rnd >= num_rounds


def by_partition(nodes: Iterable[int], infos: Mapping[int, NodeInfo]) -> list[int]:
    """Return ``nodes`` ordered by partition id (then node id).

    Flower draws node ids at random in every run, so any order or sample taken over node ids
    would change from one run to the next; partition ids are the run's own and fixed.
    """
    return sorted(nodes, key=lambda n: (infos[n].partition_id if n in infos else -1, n))


def rank_ceiling(template: AdapterState) -> int:
    """Return the largest sensible LoRA rank for the model: its smallest adapted dimension."""
    dims = [int(v.shape[1]) for k, v in template.items() if is_lora_a(k)]
    dims += [int(v.shape[0]) for k, v in template.items() if is_lora_b(k)]  # A: r x d_in, B: d_out x r
    return max(1, min(dims)) if dims else 1


class ServerRun:
    """One federated run driven by the server (see module docstring)."""

    def __init__(self, grid: Grid, cfg: RunConfig, run_dir: Path) -> None:
        self.grid, self.cfg, self.run_dir = grid, cfg, run_dir
        self.slowest_round = 0.0  # seconds of the slowest round whose every reply came back
        self.strategy: LoraStrategy = build_strategy(cfg)  # an unknown strategy fails before data loads
        cfg = self.cfg = derive_config(cfg)[0]  # task and max_length from the model and the data, unless set
        self.out = RunOutputs(run_dir, cfg, resume=cfg.output.resume)
        data = task_data(cfg.data, cfg.model.task)  # cached: the driver built it already
        self.labels = data.labels
        self.model = ServerModel(cfg, data.labels, data.test)
        self.privacy = ServerPrivacy(cfg, run_dir)
        self.strategy = self.privacy.wrap(self.strategy)  # client-level DP wraps the strategy
        self.rng = random.Random(cfg.federation.seed)
        self.max_rank = 0  # the global rank: the largest rank the clients report (set in run)
        self.failed_rounds: list[str] = []

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
        check_resumable(ckpt, self.cfg.federation.num_rounds, path)
        changes = config_changes(str(ckpt.get("config", "{}")), self.cfg)  # refuses unsafe changes
        self.strategy.load_state_dict(ckpt["strategy"])
        self.privacy.load_state_dict(ckpt["privacy"])
        self.rng.setstate(ckpt["rng"])
        self.out.truncate_after(int(ckpt["round"]))
        if changes:
            self.out.log({"kind": "resume", "round": int(ckpt["round"]), "changes": changes})
            print(f"resumed with configuration changes: {'; '.join(changes)}", flush=True)
        print(f"resuming {self.run_dir} after round {ckpt['round']}", flush=True)
        return int(ckpt["round"]), ckpt["state"]

    def run(self) -> dict[str, Any]:
        """Run all rounds; return the final global metrics record.

        Raises
        ------
        FederationError
            When a round received replies and rejected every one of them (after its
            metrics and checkpoint are written), with the reasons.
        """
        cfg = self.cfg
        every = self.privacy.admits_every_node
        nodes = wait_for_nodes(
            self.grid, cfg.federation.num_clients, cfg.federation.node_wait_timeout, keep_all=every
        )
        ceiling = rank_ceiling(self.model.template(cfg.lora.rank, cfg.federation.seed))  # any rank
        infos, left_out = query_nodes(
            self.grid, nodes, cfg, self.labels, max_rank=ceiling, shared_partitions_left_out=not every
        )
        warning = small_federation_warning(len(infos), cfg)
        if warning:
            log.warning(warning)
            print(f"warning: {warning}", flush=True)
        specs = [i.spec for i in infos.values()]
        max_rank = self.max_rank = max(s.rank for s in specs)
        resumed = self._resume()
        self.out.write_config()  # after the resume checks: a refused resume leaves config.toml as it was
        if resumed is None:
            start_round = 1
            state = self.strategy.init_state(self.model.template(max_rank, cfg.federation.seed), specs)
            # Round 0's line records the nodes left out at setup, evaluated or not.
            initial = RoundRecord(0, None, None, clients_sampled=len(nodes), rejected=left_out)
            self._record(initial, state, time.perf_counter(), evaluate=cfg.output.eval_initial)
        else:
            start_round, state = resumed[0] + 1, resumed[1]
        last: dict[str, Any] = {}
        stop = self.privacy.budget_stop(start_round) if start_round <= cfg.federation.num_rounds else None
        for rnd in range(start_round, cfg.federation.num_rounds + 1):
            if stop:
                print(stop, flush=True)
                break
            t0 = time.perf_counter()
            state, record = self._round(rnd, state, infos)
            # The next round's budget check comes first: a run that stops here ends evaluated.
            stop = self.privacy.budget_stop(rnd + 1) if rnd < cfg.federation.num_rounds else None
            evaluate = is_eval_round(rnd, cfg.federation.num_rounds, cfg.output) or bool(stop)
            last = self._record(record, state, t0, evaluate=evaluate or bool(self.failed_rounds))
            self._checkpoint(rnd, state)
            if self.failed_rounds:
                print(f"stopping: {self.failed_rounds[-1]}", flush=True)  # the console shows why
                raise FederationError(self.failed_rounds[-1])
        self._finish(state)
        return last

    def _sample(self, infos: Mapping[int, NodeInfo]) -> tuple[list[int], list[int]]:
        """Return (nodes sampled this round, known nodes no longer connected).

        A SuperNode that died is not waited for again; it rejoins the pool if it reconnects.
        """
        online = set(self.grid.get_node_ids())
        nodes = by_partition((n for n in infos if n in online), infos)  # the seeded sample is reproducible
        offline = sorted(n for n in infos if n not in online)
        if offline:
            log.warning("%d of %d nodes are no longer connected: %s", len(offline), len(infos), offline)
        k = self.cfg.federation.clients_per_round
        return self.privacy.sample_clients(nodes, k, self.rng), offline

    def _request(self, rnd: int, payload: Payload, info: NodeInfo) -> TrainRequest:
        return TrainRequest(
            run_config=self.cfg.to_json(),
            labels=tuple(self.labels),
            round=rnd,
            rank=info.spec.rank,
            alpha=float(info.spec.alpha),
            seed=self.cfg.federation.seed,
            adapter=payload.adapter,
            merge=payload.merge,
            train_a=payload.train_a,
            extras={k: str(v) for k, v in payload.extras.items()},
            privacy_ledger=self.privacy.client_conf(info.partition_id, info.spec.node_id).get(
                "privacy-ledger", ""
            ),
        )

    def exchange(
        self, rnd: int, state: AdapterState, infos: Mapping[int, NodeInfo]
    ) -> tuple[dict[int, Payload], list[tuple[int, Message]], list[int], int]:
        """Send this round's payloads; return (payloads, (node, reply) pairs, offline nodes, bytes down)."""
        selected, offline = self._sample(infos)
        payloads = {n: self.strategy.payload(state, infos[n].spec) for n in selected}
        msgs = [self._request(rnd, payloads[n], infos[n]).to_message(n) for n in selected]
        bytes_down = sum(
            record_bytes(m.content["adapter"]) + record_bytes(m.content.array_records.get("merge"))
            for m in msgs
        )
        timeout = self.cfg.federation.round_timeout or derived_timeout(self.slowest_round)
        sent = {n: (infos[n].partition_id, infos[n].num_examples) for n in selected}
        self.privacy.before_dispatch(rnd, sent, grid_run_id(self.grid))  # pending entries, before sending
        t_sent = time.perf_counter()
        replies = list(self.grid.send_and_receive(msgs, timeout=timeout)) if msgs else []
        if len(replies) == len(msgs):
            self.slowest_round = max(self.slowest_round, time.perf_counter() - t_sent)
        return payloads, list(zip(reply_nodes(msgs, replies), replies, strict=True)), offline, bytes_down

    def _round(
        self, rnd: int, state: AdapterState, infos: Mapping[int, NodeInfo]
    ) -> tuple[AdapterState, RoundRecord]:
        """Run round ``rnd`` up to the new global state; return it and the round's record (not yet logged)."""
        payloads, replies, offline, bytes_down = self.exchange(rnd, state, infos)
        # Replies arrive in whatever order the nodes finish; aggregate in partition order so the
        # floating-point sums, and so the run, do not depend on it.
        order = {n: i for i, n in enumerate(by_partition({n for n, _ in replies}, infos))}
        replies = sorted(replies, key=lambda pair: order[pair[0]])
        outcome = collect_replies(
            rnd,
            payloads,
            replies,
            {n: i.spec for n, i in infos.items()},
            {n: i.num_examples for n, i in infos.items()},
            {n: i.partition_id for n, i in infos.items()},
            size_factor=self.cfg.robust.max_update_size,
            observe=lambda node, msg: self.privacy.observe_reply(node, infos[node].partition_id, msg),
        )
        outcome = robust_results(
            outcome, payloads, self.cfg.robust, relative=self.privacy.allows_cross_client_bounds
        )
        outcome.rejected += [{"node": n, "reason": "node disconnected before the round"} for n in offline]
        for r in outcome.rejected:
            log.warning("round %s: update of node %s excluded: %s", rnd, r["node"], r["reason"])
        state = self._aggregate(rnd, state, outcome, payloads)
        for row in outcome.client_rows:
            self.out.log(row)
        record = RoundRecord(
            rnd,
            None,
            None,
            # Under DP clients send no train loss (it is not covered by the guarantee).
            train_loss=summary_loss(outcome.train_losses) if self.cfg.privacy.mode == "none" else None,
            clients_sampled=len(payloads),
            clients_ok=len(outcome.results),
            rejected=outcome.rejected,
            clipped=outcome.clipped,
            bytes_up=outcome.bytes_up,
            bytes_down=bytes_down,
        )
        self._check_failed(rnd, outcome, len(replies))
        return state, record

    def _aggregate(
        self, rnd: int, state: AdapterState, outcome: RoundOutcome, payloads: Mapping[int, Payload]
    ) -> AdapterState:
        """Aggregate the round's results; roll back (and name the offenders) if the result is not finite."""
        if not outcome.results and self.privacy.releases_every_round:
            return self.strategy.aggregate(state, [])  # client-level DP: a noise-only release, charged
        if len(outcome.results) < self.cfg.federation.min_replies and not self.privacy.releases_every_round:
            print(
                f"round {rnd}: only {len(outcome.results)} valid updates "
                f"(< min_replies = {self.cfg.federation.min_replies}); global adapter unchanged",
                flush=True,
            )
            return state
        new, offenders = aggregate_checked(self.strategy, state, outcome.results)
        for node in offenders:
            outcome.reject(node, "the aggregate with this update is not finite; round rolled back without it")
        if offenders:
            outcome.results = [r for r in outcome.results if r.spec.node_id not in offenders]
        return new

    def _check_failed(self, rnd: int, outcome: RoundOutcome, replied: int) -> None:
        """Note a round in which replies came back but every update was rejected, or none came back."""
        if not outcome.results and not replied and outcome.rejected:
            self.failed_rounds.append(
                f"round {rnd}: no client replied within the round timeout; set federation.round_timeout "
                "to more seconds (--set federation.round_timeout=...) or 0 to derive it from the first round"
            )
            return
        if outcome.results or not replied:
            return
        refused = [r for r in outcome.rejected if not str(r["reason"]).startswith(("declined", "no reply"))]
        if not refused:
            return
        reasons = "; ".join(f"node {r['node']}: {r['reason']}" for r in refused)
        self.failed_rounds.append(f"round {rnd}: every update was rejected ({reasons})")

    def _global_view(self, state: AdapterState) -> tuple[AdapterState, AdapterState | None]:
        """Return the adapter (at the largest client rank) and base merge the server evaluates and exports."""
        spec = ClientSpec(node_id=0, rank=self.max_rank, alpha=self.cfg.lora.alpha_for(self.max_rank))
        return self.strategy.final_adapter(state, spec), self.strategy.final_merge(state)

    def _record(
        self, record: RoundRecord, state: AdapterState, t0: float, *, evaluate: bool
    ) -> dict[str, Any]:
        """Evaluate the global adapter (if ``evaluate``), write the round's line and print its progress line.

        ``record.seconds`` is the whole round from ``t0`` (the round's start) to here, evaluation
        included; ``record.eval_seconds`` is the evaluation's share of it (0 when not evaluated,
        and then the ``test_*`` fields stay None).
        """
        extras: dict[str, Any] = {}
        if evaluate:
            t_eval = time.perf_counter()
            adapter, merge = self._global_view(state)
            ev = self.model.evaluate(adapter, merge, record.round)
            record.test_accuracy, record.test_loss = ev.accuracy, ev.loss
            extras = dict(ev.extras)  # causal LM: test_perplexity, test_exact_match
            record.eval_seconds = time.perf_counter() - t_eval
        record.extra = {**extras, **self.privacy.round_summary(record.round)}
        record.seconds = time.perf_counter() - t0
        row = self.out.log_round(record)
        private_tree(self.run_dir)  # this round's ledger files included
        if evaluate or record.round > 0:
            print(progress_line(row, self.cfg.federation.num_rounds, self.cfg.model.task), flush=True)
        return row

    def _finish(self, state: AdapterState) -> None:
        adapter, merge = self._global_view(state)
        self.model.export(owned_dir(self.run_dir / "adapter"), adapter, merge)  # never through a link
        plot_metrics(self.out.metrics_path, self.run_dir / "metrics.png")
        self.privacy.write_report()
        private_tree(self.run_dir)  # whatever a library wrote: owner-only, like the ledger
