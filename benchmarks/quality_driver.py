"""In-process federated runs for the backdoor benchmark and the studies: ``fedlora simulate`` without Ray.

``fedlora simulate`` runs :class:`server.loop.ServerRun` on Flower's Simulation Engine, which
starts Ray and one actor per concurrent client (about 30 s of start-up per run on a 2-core
machine, more than a whole small run's training). On one machine with one client training at a
time, the engine only routes messages, so this module routes them itself: :class:`InProcessGrid`
implements the two ``Grid`` calls the server loop makes and answers each message by calling
fedlora's real ClientApp (:data:`clients.app.app`) with a per-node ``Context`` that persists across
rounds, as a simulated SuperNode's does. Server loop, strategies, validation, client training,
record-level DP (Opacus, calibration, ledgers) and evaluation are therefore exactly the code
``fedlora simulate`` runs; only Ray's scheduling and process isolation are left out.

:class:`AggregationProbe` wraps a run's strategy and measures, every round, how far the new
global adapter is from the exact average of what the clients sent (:func:`aggregation_error`, on
the effective weights ``merge + s B A`` of :func:`effective_weights`): for FedIT this is its
cross-term error ``||sum_k p_k B_k A_k - B_bar A_bar|| / ||sum_k p_k B_k A_k||``
(:func:`cross_term_error`), for FLoRA the error of its stacking, measured rather than assumed.
:class:`ZeroPadding` is the plain zero-padding baseline for heterogeneous ranks (pad, then
example-weighted FedIT average), which fedlora's strategy registry does not offer.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict

from fedlora.adapters import AdapterState, is_lora_a, split_state
from fedlora.config import RunConfig, with_overrides
from strategies.base import ClientResult, LoraStrategy, StrategyWrapper
from strategies.batched import ModuleBatch, aggregate_modules
from strategies.common import example_weights
from strategies.ranked import RankedStrategy


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


def effective_weights(
    state: Mapping[str, torch.Tensor], scale: float, merge: Mapping[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Return, per adapted module, the weight change the adapter applies: ``merge_B merge_A + s B A``.

    ``merge`` is FLoRA's cumulative merge (scale already folded into its A; None for the other
    methods). Results are float64, d_out x d_in.
    """
    pairs, _ = split_state(state)
    merged = split_state(merge)[0] if merge else {}
    out = {}
    for module, pair in pairs.items():
        w = scale * (pair.b.to(torch.float64) @ pair.a.to(torch.float64))
        if module in merged:
            w = w + merged[module].b.to(torch.float64) @ merged[module].a.to(torch.float64)
        out[module] = w
    return out


def aggregation_error(
    clients: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], new: Mapping[str, torch.Tensor]
) -> float:
    """Return ``sqrt(sum_m ||sum_k p_k W_km - G_m||^2) / sqrt(sum_m ||sum_k p_k W_km||^2)``.

    ``clients[k][m]`` is client ``k``'s effective weight ``W_km`` of module ``m``, ``new[m]`` the
    aggregated global one ``G_m`` and ``weights`` the ``p_k``. NaN when every exact average is zero.
    """
    num = den = 0.0
    for module, g in new.items():
        exact = sum(float(p) * w[module] for p, w in zip(weights, clients, strict=True))
        num += float(torch.linalg.matrix_norm(exact - g) ** 2)
        den += float(torch.linalg.matrix_norm(exact) ** 2)
    return (num**0.5) / (den**0.5) if den > 0 else float("nan")


class AggregationProbe(StrategyWrapper):
    """Delegates everything; records :func:`aggregation_error` of every round's aggregation.

    The exact average is ``sum_k p_k W_k`` of the clients' effective weights (each at its own
    scale ``s_k``, example weights ``p_k``); the global one is read at the strategy's global scale
    (a rank-heterogeneous method's ``global_scale``, else the clients' common scale). Measured
    when every client sends both factors (FedIT, FLoRA, LoRA-FAIR, FFA-LoRA whose A comes back
    unchanged, FlexLoRA, HetLoRA, zero-padding); one value per call of :meth:`aggregate`, i.e.
    per round (the server loop retries a round only after a non-finite update, which these
    benchmarks' runs never send). FLoRA's update lives in its merge, read with ``final_merge``
    before and after the round. HetLoRA weights clients by update norm on purpose, so its value
    includes that reweighting as well as the cross terms.
    """

    def __init__(self, inner: LoraStrategy) -> None:
        super().__init__(inner)
        self.errors: list[float] = []

    def _global_scale(self, results: Sequence[ClientResult]) -> float | None:
        if isinstance(self.inner, RankedStrategy):
            return self.inner.global_scale
        scales = {r.spec.scale for r in results}
        return scales.pop() if len(scales) == 1 else None

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Aggregate with the wrapped method, then measure the round's aggregation error."""
        scale = self._global_scale(results) if results else None
        measurable = scale is not None and all(any(is_lora_a(k) for k in r.state) for r in results)
        merge_before = self.inner.final_merge(state) if measurable else None
        new = self.inner.aggregate(state, results)
        if measurable and scale is not None:
            clients = [effective_weights(r.state, r.spec.scale, merge_before) for r in results]
            glob = effective_weights(new, scale, self.inner.final_merge(new))
            p = [float(w) for w in example_weights(results)]
            self.errors.append(aggregation_error(clients, p, glob))
        return new


def zero_pad_batch(
    batch: ModuleBatch, weights: torch.Tensor, scales: Sequence[float], global_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``A_g = sum_k p_k pad(A_k)``, ``B_g = sum_k p_k pad((s_k / s_g) B_k)`` per module.

    Shapes: ``A_g`` M x R x d_in, ``B_g`` M x d_out x R; ``weights`` (K,) are the ``p_k``.
    """
    a_g, b_g = torch.zeros_like(batch.prev_a), torch.zeros_like(batch.prev_b)
    for p, s, a, b in zip(weights.tolist(), scales, batch.a, batch.b, strict=True):
        a_g[:, : a.shape[1]].add_(a, alpha=p)
        b_g[..., : b.shape[2]].add_(b, alpha=p * s / global_scale)
    return a_g, b_g


class ZeroPadding(RankedStrategy):
    """Plain zero-padding for heterogeneous ranks: pad to ``R``, average with example weights.

    The baseline FlexLoRA (Bai et al., NeurIPS 2024) and HetLoRA (Cho et al., EMNLP 2024)
    compare against: HetLoRA without its norm weights, i.e. FedIT on zero-padded factors (so
    with FedIT's cross-term error). Benchmark-only: not in the strategy registry.
    """

    name = "zeropad"

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Zero-pad every client to ``R`` (scales folded into B) and average by example counts."""
        p = example_weights(results)
        scales = [r.spec.scale for r in results]
        return aggregate_modules(
            state, results, lambda batch: zero_pad_batch(batch, p, scales, self.global_scale), p
        )


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
    probe: bool = False,
    strategy: Callable[[], LoraStrategy] | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Run ``cfg`` in-process (see module docstring); return per-round global metrics.

    Parameters
    ----------
    cfg
        The run configuration, as ``fedlora simulate`` would take it.
    node_ranks
        Optional LoRA rank of each node (``lora-rank`` node-config), for heterogeneous ranks.
    probe
        Wrap the strategy in :class:`AggregationProbe` and return its per-round errors.
    strategy
        Builds the strategy to run instead of ``cfg.federation.strategy`` (e.g.
        :class:`ZeroPadding`); ``cfg`` should then name a method with the same client contract.
    out_dir
        Run directory (default: a fresh temporary one).

    Returns
    -------
    dict
        ``accuracy`` and ``loss`` per round (round 0 = the untrained adapter), ``epsilon`` (the
        largest client epsilon after the last round, None without DP), ``aggregation_error`` (per
        round, when probed; empty when not measurable) and ``run_dir``.
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
        if strategy is not None:
            server.strategy = server.privacy.wrap(strategy())
        probed = AggregationProbe(server.strategy) if probe else None
        if probed is not None:
            server.strategy = probed
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
        "aggregation_error": list(probed.errors) if probed is not None else None,
        "run_dir": str(run_dir),
    }
