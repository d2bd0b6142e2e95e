"""A bound across rounds: no node's cumulative deviation from the federation may outgrow an honest one's.

The per-round defences of :mod:`strategies.robust` bound what one node moves the model in *one*
round. A backdoor is planted over a campaign: a poisoned node pulls the same way every round,
so its pull adds up linearly in the number of rounds, while an honest node's deviation from the
federation (minibatch noise, its own sample of the data) points a new way each round and adds up
roughly as the square root. This module bounds the sum, not the step.

Every round, for the nodes of that round (all at the same shapes):

* ``d_k = X_k - X_sent`` is node ``k``'s update, per tensor (LoRA factors and head);
* ``c`` is their coordinate-wise median (:func:`update_residuals`), which one node of three or
  more cannot move far, and ``e_k = d_k - c`` node ``k``'s *residual*: what it adds that the
  federation does not;
* ``H_k`` is the sum of node ``k``'s accepted residuals over all earlier rounds (its history);
* the reference is the lower median over the round's nodes of ``||H_k + e_k||``, and every node
  keeps the largest share ``t_k`` in [0, 1] of its residual with ``||H_k + t_k e_k|| <= factor x
  reference`` (:func:`keep_fraction`, :func:`campaign_fractions`); its update becomes
  ``c + t_k e_k`` and ``H_k`` grows by ``t_k e_k``.

So over any number of rounds a node's total pull away from the federation's median stays within
``factor`` times that of the median node. The median, lower median and residual construction
follow the norm-bounding idea of Sun et al., "Can You Really Backdoor Federated Learning?"
(2019), applied to the cumulative update; the observation that a campaign's pull grows linearly
while honest noise grows as sqrt(rounds) is what FLAME (Nguyen et al., USENIX Security 2022) also
exploits with clustering. :class:`CampaignBound` wraps a strategy whose nodes all hold the
global factors at one shape (FedIT, FFA-LoRA, LoRA-FAIR).

Limits (docs/security.md): with fewer than three nodes in a round nothing is bounded (no median
that one node cannot set); a node whose id changes starts with an empty history; an attacker that
stays within ``factor`` of the median node's random walk still moves the model that much.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.adapters import AdapterState
from fedlora.config import RunConfig
from strategies.base import ClientResult, LoraStrategy, StrategyWrapper
from strategies.robust import coordinate_median, lower_median

Tensors = Mapping[str, torch.Tensor]

#: Methods whose nodes all send the global tensors at one shape (equal ranks are enforced).
CAMPAIGN_STRATEGIES = ("fedit", "ffa", "fair")
#: Key of the per-node histories in :meth:`CampaignBound.state_dict` (the inner state sits beside it).
HISTORY_KEY = "campaign_history"


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def sq_norm(x: Tensors) -> float:
    """Return ``sum_k ||x[k]||_F^2`` over every tensor of ``x``."""
    return float(sum(float((_f64(v) ** 2).sum()) for v in x.values()))


def dot(x: Tensors, y: Tensors) -> float:
    """Return ``sum_k <x[k], y[k]>`` over the names of ``x`` (a name missing from ``y`` counts 0)."""
    return float(sum(float((_f64(v) * _f64(y[k])).sum()) for k, v in x.items() if k in y))


def update_residuals(
    deltas: Sequence[Tensors],
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """Return ``([c_k], [d_k - c_k])``: per node, the others' coordinate-wise median update, its residual.

    Leaving the node out makes its reference one it cannot move: with the median of all nodes, a
    node that pushes one way every round shifts the median a little that way every round, and
    that shift adds up over a campaign like the push itself. Every ``deltas[k]`` must hold the
    same names and shapes; at least two nodes.
    """
    names = list(deltas[0])
    centres = [
        {n: coordinate_median([d[n] for j, d in enumerate(deltas) if j != k]) for n in names}
        for k in range(len(deltas))
    ]
    residuals = [{n: _f64(d[n]) - c[n] for n in names} for d, c in zip(deltas, centres, strict=True)]
    return centres, residuals


def keep_fraction(history: Tensors | None, residual: Tensors, cap: float) -> float:
    """Return the largest ``t`` in [0, 1] with ``||H + t e|| <= cap`` (``H``: history, ``e``: residual).

    ``||H + t e||^2 = a t^2 + 2 b t + h`` with ``a = ||e||^2``, ``b = <H, e>``, ``h = ||H||^2``.
    When no ``t`` in [0, 1] meets the cap (the history is already beyond it), the ``t`` that
    brings ``H + t e`` closest to the origin, ``clamp(-b / a, 0, 1)``: a node over its budget
    keeps only what takes it back.
    """
    a = sq_norm(residual)
    b = dot(history, residual) if history else 0.0
    h = sq_norm(history) if history else 0.0
    if a + 2 * b + h <= cap * cap:
        return 1.0
    if a <= 0.0:
        return 1.0  # nothing to scale (and t = 1 already failed only through H)
    disc = b * b - a * (h - cap * cap)
    if disc >= 0.0:
        hi = (-b + math.sqrt(disc)) / a  # the feasible t form an interval ending at hi; 1 is not in it
        if 0.0 <= hi < 1.0:
            return hi
    return min(1.0, max(0.0, -b / a))


def campaign_fractions(
    histories: Sequence[Tensors | None], residuals: Sequence[Tensors], factor: float
) -> list[float]:
    """Return each node's kept share ``t_k`` of its residual (see module docstring).

    Parameters
    ----------
    histories
        Per node of the round, the sum of its earlier accepted residuals (None: no history).
    residuals
        Per node, this round's residual ``e_k`` (names as in ``histories``).
    factor
        A node's cumulative residual may reach ``factor x`` the round's lower median of
        ``||H_k + e_k||``. Fewer than three nodes, or a zero reference: every ``t_k`` is 1.
    """
    if len(residuals) < 3:
        return [1.0] * len(residuals)
    tentative = [
        math.sqrt(max(0.0, sq_norm(e) + (2 * dot(h, e) + sq_norm(h) if h else 0.0)))
        for h, e in zip(histories, residuals, strict=True)
    ]
    reference = lower_median(tentative)
    if not reference > 0.0:
        return [1.0] * len(residuals)
    cap = factor * reference
    return [keep_fraction(h, e, cap) for h, e in zip(histories, residuals, strict=True)]


class CampaignBound(StrategyWrapper):
    """Bound each node's cumulative residual before the wrapped method aggregates (module docstring).

    Each result's trained tensors become ``sent + c + t_k e_k`` (the tensors the node did not
    change stay as sent); the per-node histories are part of :meth:`state_dict`, so a resumed
    run and :func:`strategies.robust.aggregate_checked`'s retries see the same ones.
    ``last_fractions`` holds the round's ``{node: t_k}`` for the round's record.
    """

    def __init__(self, inner: LoraStrategy, factor: float) -> None:
        if getattr(inner, "name", "") not in CAMPAIGN_STRATEGIES:
            raise ValueError(
                f"the campaign bound applies to {', '.join(CAMPAIGN_STRATEGIES)} (one shape for every "
                f"node), not {getattr(inner, 'name', inner)!r}"
            )
        if not (math.isfinite(factor) and factor >= 1.0):
            raise ValueError(f"the campaign bound's factor must be a finite number >= 1, got {factor!r}")
        super().__init__(inner)
        self.factor = factor
        self.history: dict[int, dict[str, torch.Tensor]] = {}
        self.last_fractions: dict[int, float] = {}

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Replace each node's residual by its kept share, record the histories, then aggregate."""
        bounded = self.bound(state, results)
        return self.inner.aggregate(state, bounded)

    def bound(self, state: AdapterState, results: Sequence[ClientResult]) -> list[ClientResult]:
        """Return ``results`` with every residual cut to its kept share (and grow the histories)."""
        self.last_fractions = {}
        if len(results) < 3:
            return list(results)
        sent = [self.inner.payload(state, r.spec).adapter for r in results]
        names = [n for n in results[0].state if n in sent[0]]
        shapes = {tuple((n, tuple(r.state[n].shape)) for n in names) for r in results}
        if len(shapes) != 1 or any(set(names) - set(s) for s in sent):
            raise ValueError("the campaign bound needs every node's update at one shape (equal ranks)")
        deltas = [
            {n: _f64(r.state[n]) - _f64(s[n]) for n in names} for r, s in zip(results, sent, strict=True)
        ]
        centres, residuals = update_residuals(deltas)
        nodes = [r.spec.node_id for r in results]
        fractions = campaign_fractions([self.history.get(n) for n in nodes], residuals, self.factor)
        out = []
        for r, s, node, c, e, t in zip(results, sent, nodes, centres, residuals, fractions, strict=True):
            kept = {n: t * e[n] for n in names}
            old = self.history.get(node)
            self.history[node] = {n: (old[n] + kept[n]) if old else kept[n] for n in names}
            self.last_fractions[node] = t
            if t >= 1.0:
                out.append(r)
                continue
            new = {n: (_f64(s[n]) + c[n] + kept[n]).to(r.state[n].dtype) for n in names}
            out.append(dataclasses.replace(r, state={**r.state, **new}))
        return out

    def state_dict(self) -> dict[str, Any]:
        """Return the wrapped method's state plus the per-node histories (keyed by node id as text)."""
        hist = {str(n): dict(h) for n, h in self.history.items()}
        return {**self.inner.state_dict(), HISTORY_KEY: hist}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned (a state without histories starts them empty)."""
        rest = {k: v for k, v in data.items() if k != HISTORY_KEY}
        self.inner.load_state_dict(rest)
        hist = data.get(HISTORY_KEY, {})
        self.history = {int(n): {k: _f64(v) for k, v in h.items()} for n, h in hist.items()}


def campaign_wrapped(strategy: LoraStrategy, cfg: RunConfig) -> LoraStrategy:
    """Return ``strategy`` in a :class:`CampaignBound` when ``robust.campaign_bound`` is set, else unchanged.

    Raises
    ------
    ValueError
        Under client-level DP (the bound moves each update by an amount that depends on the
        other clients' updates, so the release's sensitivity would no longer be the clip ``C``),
        or for a method outside :data:`CAMPAIGN_STRATEGIES`.
    """
    factor = cfg.robust.campaign_bound
    if factor <= 0:
        return strategy
    if cfg.privacy.mode == "client":
        raise ValueError(
            "cannot run under client-level DP: it moves each update by an amount that depends on the "
            "other clients' updates, which breaks the release's sensitivity C; the DP clip already "
            "bounds every client's influence on every release. Set robust.campaign_bound = 0"
        )
    return CampaignBound(strategy, factor)
