"""In-process federated runs for the learning-quality benchmarks: ``fedlora simulate`` without Ray.

``fedlora simulate`` runs :class:`server.loop.ServerRun` on Flower's Simulation Engine, which
starts Ray and one actor per concurrent client (about 30 s of start-up per run on a 2-core
machine, more than a whole small run's training). On one machine with one client training at a
time, the engine only routes messages, so this module routes them itself: :class:`InProcessGrid`
implements the two ``Grid`` calls the server loop makes and answers each message by calling
fedlora's real ClientApp (:data:`clients.app.app`) with a per-node ``Context`` that persists across
rounds, as a simulated SuperNode's does. Server loop, strategies, validation, client training,
record-level DP (Opacus, calibration, ledgers) and evaluation are therefore exactly the code
``fedlora simulate`` runs; only Ray's scheduling and process isolation are left out.

:class:`CrossTermProbe` wraps a run's strategy and measures, every round, FedIT's aggregation
error ``||sum_k p_k s B_k A_k - s B_bar A_bar||_F / ||sum_k p_k s B_k A_k||_F`` on the updates the
clients really sent (see :func:`cross_term_error`).
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict

from fedlora.adapters import AdapterState, is_lora_a, split_state
from fedlora.config import RunConfig, with_overrides
from strategies.base import ClientResult, StrategyWrapper
from strategies.common import example_weights


def cross_term_error(results: Sequence[ClientResult]) -> float:
    """Return FedIT's relative cross-term error over all modules for one round's client states.

    For every adapted module with client factors ``A_k`` (r x d_in), ``B_k`` (d_out x r), example
    weights ``p_k`` and a common scale ``s`` (which cancels in the ratio)::

        exact = sum_k p_k B_k A_k,    fedit = (sum_k p_k B_k)(sum_k p_k A_k)
        error = sqrt(sum_modules ||exact - fedit||_F^2) / sqrt(sum_modules ||exact||_F^2)

    0 when all clients hold the same A (FFA-LoRA) or when one client takes part; NaN when every
    product is zero (round 1 of a B = 0 start with no training). Needs equal ranks.

    Raises
    ------
    ValueError
        If the clients' ranks differ (the FedIT average is undefined then).
    """
    ranks = {r.spec.rank for r in results}
    if len(ranks) != 1:
        raise ValueError(f"cross_term_error needs equal client ranks, got {sorted(ranks)}")
    p = example_weights(results)
    per_client = [split_state(r.state)[0] for r in results]
    num = den = 0.0
    for module in per_client[0]:
        a = [pairs[module].a.to(torch.float64) for pairs in per_client]
        b = [pairs[module].b.to(torch.float64) for pairs in per_client]
        exact = sum(float(w) * (bk @ ak) for w, ak, bk in zip(p, a, b, strict=True))
        a_bar = sum(float(w) * ak for w, ak in zip(p, a, strict=True))
        b_bar = sum(float(w) * bk for w, bk in zip(p, b, strict=True))
        num += float(torch.linalg.matrix_norm(exact - b_bar @ a_bar) ** 2)
        den += float(torch.linalg.matrix_norm(exact) ** 2)
    return (num**0.5) / (den**0.5) if den > 0 else float("nan")


class CrossTermProbe(StrategyWrapper):
    """Delegates everything; records :func:`cross_term_error` of every round's client results.

    One value per call of :meth:`aggregate`, i.e. per round unless the server loop retried a
    round without a non-finite update (it never does in these benchmarks' runs).
    """

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.errors: list[float] = []

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Measure the round's cross-term error, then aggregate with the wrapped method."""
        # FFA-LoRA's clients send no A (it is shared and frozen): nothing to measure, error 0.
        has_a = all(any(is_lora_a(k) for k in r.state) for r in results)
        if results and has_a and len({r.spec.rank for r in results}) == 1:
            self.errors.append(cross_term_error(results))
        return self.inner.aggregate(state, results)


class InProcessGrid:
    """A Flower ``Grid`` stand-in whose nodes are fedlora's ClientApp called in this process.

    Node ``i`` (id ``100 + i``) has ``node_config = {"partition-id": i, "num-partitions": n}`` plus
    ``extra_node_config[i]`` (e.g. ``lora-rank``), and one ``Context`` for the whole run, so its
    ``context.state`` (the client's privacy ledger) carries over between rounds as in simulation.
    """

    def __init__(
        self, num_nodes: int, extra_node_config: Mapping[int, Mapping[str, Any]] | None = None
    ) -> None:
        extra = extra_node_config or {}
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": num_nodes, **dict(extra.get(i, {}))},
                state=RecordDict(),
                run_config={},
            )
            for i in range(num_nodes)
        }

    def get_node_ids(self) -> list[int]:
        """Return the ids of every node (all are always connected)."""
        return sorted(self.contexts)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver each message to its node's ClientApp, one after the other; return the replies."""
        from clients.app import app as client_app

        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = uuid.uuid4().hex  # the SuperLink stamps ids
            node = msg.metadata.dst_node_id
            reply = client_app(msg, self.contexts[node])
            reply.metadata.__dict__["_src_node_id"] = node
            replies.append(reply)
        return replies


def _set_task_identity() -> tuple[Any, Any, Any]:
    """Set Flower's process-global task identity (Messages are stamped with it); return the old one."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    return saved


def run_federated(
    cfg: RunConfig,
    node_ranks: Sequence[int] | None = None,
    *,
    probe_cross_terms: bool = False,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` in-process (see module docstring); return per-round global metrics.

    Parameters
    ----------
    cfg
        The run configuration, as ``fedlora simulate`` would take it.
    node_ranks
        Optional LoRA rank of each node (``lora-rank`` node-config), for heterogeneous ranks.
    probe_cross_terms
        Wrap the strategy in :class:`CrossTermProbe` and return its per-round errors.
    out_dir
        Run directory (default: a fresh temporary one).

    Returns
    -------
    dict
        ``accuracy`` and ``loss`` per round (round 0 = the untrained adapter), ``epsilon`` (the
        largest client epsilon after the last round, None without DP), ``cross_term`` (per round,
        when probed) and ``run_dir``.
    """
    from clients.privacy import STATE_ROOT_ENV
    from server.loop import ServerRun
    from server.outputs import read_metrics

    run_dir = out_dir or Path(tempfile.mkdtemp(prefix="fedlora-quality-"))
    cfg = with_overrides(cfg, {"output.out_dir": str(run_dir)})
    extra = {i: {"lora-rank": r} for i, r in enumerate(node_ranks)} if node_ranks else None
    grid = InProcessGrid(cfg.federation.num_clients, extra)
    saved_identity = _set_task_identity()
    old_root = os.environ.get(STATE_ROOT_ENV)
    os.environ[STATE_ROOT_ENV] = str(run_dir / "nodes")
    try:
        server = ServerRun(grid, cfg, run_dir)  # type: ignore[arg-type]  # duck-typed Grid
        probe = CrossTermProbe(server.strategy) if probe_cross_terms else None
        if probe is not None:
            server.strategy = probe
        server.run()
    finally:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved_identity
        if old_root is None:
            os.environ.pop(STATE_ROOT_ENV, None)
        else:
            os.environ[STATE_ROOT_ENV] = old_root
    rows = [m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("kind") == "global"]
    eps = rows[-1].get("dp_epsilon_max")
    return {
        "accuracy": [float(r["test_accuracy"]) for r in rows],
        "loss": [float(r["test_loss"]) for r in rows],
        "epsilon": float(eps) if eps is not None else None,
        "cross_term": list(probe.errors) if probe is not None else None,
        "run_dir": str(run_dir),
    }
