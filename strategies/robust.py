"""Robust aggregation for LoRA: bounded updates, capped weights, robust centres, finite checks.

A few nodes can be hostile. These pure functions (and one strategy wrapper) stop one of them
from taking over the global adapter; each composes with the LoRA methods where the method's
math allows (see docs/security.md for the per-strategy table):

* :func:`update_norm` measures a client's change of the effective weights
  ``ΔW = s (B' A' - B A)`` per module in factored form (r x r Gram matrices, never d_out x d_in).
* :func:`bound_updates` rejects astronomically large updates (absolute caps) and clips each
  remaining update to ``bound x`` the round's lower median norm by moving the client's
  factors back toward what it received (Sun et al., "Can You Really Backdoor Federated
  Learning?", 2019, norm bounding; the median makes the bound scale-free).
* :func:`cap_example_counts` caps a client's example count at a multiple of the round's
  median, so a node claiming 10^9 examples cannot take all the weight.
* :class:`RobustCenter` replaces a plain average by the coordinate-wise median or trimmed
  mean (Yin et al., "Byzantine-Robust Distributed Learning", ICML 2018) for methods whose
  global state *is* an average of client tensors (FedIT's A and B, FFA-LoRA's B).
* :func:`aggregate_checked` aggregates, checks the new global state is finite and, if not,
  finds the results that poison it (leave-one-out) so the round can run without them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import torch

from fedlora.adapters import AdapterState, a_name, b_name, is_lora, lora_modules
from strategies.base import ClientResult, LoraStrategy, StrategyWrapper

ROBUST_CENTERS = ("mean", "median", "trimmed-mean")
CENTER_STRATEGIES = ("fedit", "ffa")  # global state = average of the clients' tensors

SMALL_FEDERATION = 4  # rounds with at most this many updates use the tighter factors below
SMALL_NORM_BOUND = 1.5  # the norm bound of a small round (at most; 0 stays off)
SMALL_WEIGHT_FACTOR = 1.0  # the weight cap of a small round: no count above the median buys weight


@dataclasses.dataclass(frozen=True)
class Bounded:
    """Outcome of :func:`bound_updates`: kept results, rejected and clipped nodes (with reasons)."""

    results: list[ClientResult]
    rejected: list[dict[str, object]]
    clipped: list[dict[str, object]]
    norms: dict[int, float]


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _module_sq(
    a0: torch.Tensor | None, b0: torch.Tensor, a1: torch.Tensor | None, b1: torch.Tensor, t: float
) -> float:
    """Return ``||B_t A_t - B_0 A_0||_F^2`` with ``X_t = X_0 + t (X_1 - X_0)``, in factored form.

    ``B_t A_t - B_0 A_0 = [B_t, t dB] @ [t dA; A_0]`` (d_out x 2r times 2r x d_in), so the
    squared norm is the sum of the elementwise product of two 2r x 2r Gram matrices.
    Without A (FFA-LoRA, A frozen and identical on every client) the B change is measured.
    """
    db = t * (_f64(b1) - _f64(b0))
    if a0 is None or a1 is None:
        return float((db * db).sum())
    da = t * (_f64(a1) - _f64(a0))
    bc = torch.cat([_f64(b0) + db, db], dim=1)  # d_out x 2r
    ac = torch.cat([da, _f64(a0)], dim=0)  # 2r x d_in
    return float(((bc.T @ bc) * (ac @ ac.T)).sum().clamp_min(0.0))


def update_norm(
    sent: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], scale: float, t: float = 1.0
) -> float:
    """Return the Frobenius norm of a client's update, ``sqrt(sum_m ||ΔW_m||^2 + sum ||Δhead||^2)``.

    Parameters
    ----------
    sent, got
        What the server sent the client and what the client's update rebuilds (same names).
    scale
        The client's LoRA scale ``alpha / r`` (``ΔW = scale * ΔBA``).
    t
        Evaluate the update shrunk to ``sent + t (got - sent)`` (used to clip).
    """
    total = 0.0
    for module in lora_modules(got):
        an, bn = a_name(module), b_name(module)
        total += scale**2 * _module_sq(sent.get(an), sent[bn], got.get(an), got[bn], t)
    for name in got:
        if not is_lora(name):
            d = t * (_f64(got[name]) - _f64(sent[name]))
            total += float((d * d).sum())
    return math.sqrt(total) if math.isfinite(total) else math.inf


def shrink(sent: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], t: float) -> AdapterState:
    """Return ``sent + t (got - sent)`` for every tensor of ``got`` (dtypes of ``got``)."""
    return {k: (_f64(sent[k]) + t * (_f64(v) - _f64(sent[k]))).to(v.dtype) for k, v in got.items()}


def clip_factor(
    sent: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor], scale: float, bound: float
) -> float:
    """Return the largest ``t`` in [0, 1] (by bisection) whose shrunk update has norm <= ``bound``."""
    if update_norm(sent, got, scale) <= bound:
        return 1.0
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        if update_norm(sent, got, scale, mid) <= bound:
            lo = mid
        else:
            hi = mid
    return lo


def small_round_factors(k: int, norm_bound: float, weight_factor: float) -> tuple[float, float]:
    """Return the (norm bound, weight cap) for a round of ``k`` updates.

    With 2 to :data:`SMALL_FEDERATION` updates the configured factors (3 and 3 by default) let
    one node send 3x the median norm at 3x the median weight, 9 honest pulls: it set 87-99% of
    a round's change in a 4-node federation. Such rounds use at most :data:`SMALL_NORM_BOUND`
    and :data:`SMALL_WEIGHT_FACTOR` (a factor of 0, off, stays off). See :func:`liar_share`.
    """
    if not 2 <= k <= SMALL_FEDERATION:
        return norm_bound, weight_factor
    return min(norm_bound, SMALL_NORM_BOUND), min(weight_factor, SMALL_WEIGHT_FACTOR)


def liar_share(k: int, norm_bound: float, weight_factor: float) -> float:
    """Return the largest share of a round's change one of ``k`` nodes can set (aligned updates).

    ``k - 1`` honest nodes send updates of one norm ``m`` at one weight ``n``; the liar sends
    ``norm_bound x m`` at ``weight_factor x n`` (the most both caps let through, both lower
    medians being the honest values), all in one direction. Its share of the weighted sum is
    ``b w / (b w + k - 1)``; an honest node's is ``1 / k``. The factors applied are those of
    :func:`small_round_factors`; a factor of 0 (off) gives 1.0.
    """
    b, w = small_round_factors(k, norm_bound, weight_factor)
    if b <= 0 or w <= 0:  # a defence off: the liar's pull is unbounded
        return 1.0
    pull = b * w
    return pull / (pull + k - 1)


def lower_median(values: Sequence[float]) -> float:
    """Return the lower median (with two values, the smaller: one liar cannot raise it)."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


def bound_updates(
    results: Sequence[ClientResult],
    sent: Mapping[int, Mapping[str, torch.Tensor]],
    *,
    bound: float,
    max_norm: float,
    max_abs: float,
) -> Bounded:
    """Reject absurd updates, then clip each to ``bound x`` the lower median norm of the round.

    Parameters
    ----------
    results
        Validated results (finite, right names and shapes).
    sent
        Per node id, the adapter tensors the server sent it.
    bound
        Relative bound (e.g. 3.0); 0 disables clipping.
    max_norm, max_abs
        Absolute caps: an update whose norm exceeds ``max_norm`` or one of whose tensors
        holds a value above ``max_abs`` in magnitude is rejected.
    """
    kept: list[ClientResult] = []
    rejected: list[dict[str, object]] = []
    norms: dict[int, float] = {}
    bound = small_round_factors(len(results), bound, 0.0)[0]
    for r in results:
        node = r.spec.node_id
        peak = max((float(v.detach().abs().max()) for v in r.state.values() if v.numel()), default=0.0)
        if peak > max_abs:
            rejected.append({"node": node, "reason": f"a value of magnitude {peak:.3g} exceeds {max_abs:g}"})
            continue
        norm = update_norm(sent[node], r.state, r.spec.scale)
        if not norm <= max_norm:
            rejected.append({"node": node, "reason": f"update norm {norm:.3g} exceeds the cap {max_norm:g}"})
            continue
        norms[node] = norm
        kept.append(r)
    clipped: list[dict[str, object]] = []
    if bound <= 0 or len(kept) < 2:
        return Bounded(kept, rejected, clipped, norms)
    limit = bound * lower_median(list(norms.values()))
    if limit <= 0:  # most updates are empty: nothing to scale against (zeroing the rest would be an attack)
        return Bounded(kept, rejected, clipped, norms)
    out = []
    for r in kept:
        node = r.spec.node_id
        if norms[node] <= limit:
            out.append(r)
            continue
        t = clip_factor(sent[node], r.state, r.spec.scale, limit)
        clipped.append({"node": node, "norm": norms[node], "bound": limit, "factor": t})
        out.append(dataclasses.replace(r, state={**r.state, **shrink(sent[node], r.state, t)}))
    return Bounded(out, rejected, clipped, norms)


def cap_example_counts(results: Sequence[ClientResult], factor: float) -> list[ClientResult]:
    """Cap each example count at ``factor x`` the round's lower median count (0 disables).

    The median, not the mean: one node claiming 10^9 examples raises the mean to its own
    level, but not the median. A round of at most :data:`SMALL_FEDERATION` updates caps at
    :data:`SMALL_WEIGHT_FACTOR` x the median (:func:`small_round_factors`).
    """
    factor = small_round_factors(len(results), 0.0, factor)[1]
    if factor <= 0 or len(results) < 2:
        return list(results)
    cap = max(1, int(factor * lower_median([r.num_examples for r in results])))
    return [dataclasses.replace(r, num_examples=min(r.num_examples, cap)) for r in results]


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Return the coordinate-wise median (mean of the two middle values for even K), float64."""
    return torch.stack([_f64(t) for t in tensors]).quantile(0.5, dim=0)


def trim_count(k: int, fraction: float) -> int:
    """Return how many values the trimmed mean drops at each end of ``k``.

    ``floor(fraction k)``, but at least one when ``k >= 3`` (the default 0.2 trimmed nothing
    below 5 nodes, so one liar went straight into the mean) and never all of them.
    """
    cut = math.floor(fraction * k)
    if k >= 3:
        cut = max(cut, 1)
    return min(cut, (k - 1) // 2)


def trimmed_mean(tensors: Sequence[torch.Tensor], fraction: float) -> torch.Tensor:
    """Return the coordinate-wise mean after dropping the :func:`trim_count` largest and smallest."""
    stacked = torch.stack([_f64(t) for t in tensors]).sort(dim=0).values
    k = trim_count(len(tensors), fraction)
    return stacked[k : len(tensors) - k].mean(dim=0)


class RobustCenter(StrategyWrapper):
    """Wrap FedIT or FFA-LoRA: the global tensors become a robust centre of the clients' tensors.

    Both methods set each received tensor to the (example-weighted) mean of the clients'
    values; the median / trimmed mean replaces that mean (unweighted: weights are what a
    liar controls). Product-based methods (FlexLoRA, FLoRA, LoRA-FAIR, HetLoRA) have no
    coordinate-wise mean to replace; they rely on :func:`bound_updates` instead.
    """

    def __init__(self, inner: LoraStrategy, center: str, fraction: float = 0.2) -> None:
        if getattr(inner, "name", "") not in CENTER_STRATEGIES:
            raise ValueError(
                f"robust centre {center!r} applies to {', '.join(CENTER_STRATEGIES)}, "
                f"not {getattr(inner, 'name', inner)!r}; use norm bounding for the other methods"
            )
        if center not in ROBUST_CENTERS[1:]:
            raise ValueError(f"robust centre must be one of {ROBUST_CENTERS[1:]}, got {center!r}")
        super().__init__(inner)
        self.center, self.fraction = center, fraction

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Return ``state`` with every tensor the clients sent replaced by its robust centre."""
        out = {k: v.clone() for k, v in state.items()}
        for name in results[0].state:
            values = [r.state[name] for r in results]
            c = coordinate_median(values) if self.center == "median" else trimmed_mean(values, self.fraction)
            out[name] = c.to(state[name].dtype)
        return out


def is_finite_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Return True when every floating tensor of ``state`` is finite."""
    return all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())


def aggregate_checked(
    strategy: LoraStrategy, state: AdapterState, results: Sequence[ClientResult]
) -> tuple[AdapterState, list[int]]:
    """Aggregate and return ``(new state, offending node ids)``; the old state if no subset is finite.

    The new global state and the strategy's base merge (FLoRA) must be finite. When they are
    not, each result is left out in turn; the results whose removal makes the aggregate
    finite are the offenders and the round is aggregated without them. A strategy error
    (e.g. a singular system) counts as a non-finite aggregate. The strategy's own state
    (:meth:`~strategies.base.LoraStrategy.state_dict`) is restored before every attempt,
    so it ends as the accepted aggregate left it (or unchanged when the round is rolled back).
    """
    saved = strategy.state_dict()

    def attempt(rs: Sequence[ClientResult]) -> AdapterState | None:
        strategy.load_state_dict(saved)
        if not rs:
            return None
        try:
            new = strategy.aggregate(state, rs)
            merge = strategy.final_merge(new)
        except (ValueError, RuntimeError, ArithmeticError):
            return None
        return new if is_finite_state(new) and is_finite_state(merge or {}) else None

    new = attempt(results)
    if new is not None:
        return new, []
    offenders = [
        r.spec.node_id
        for i, r in enumerate(results)
        if attempt([*results[:i], *results[i + 1 :]]) is not None
    ]
    if offenders:
        new = attempt([r for r in results if r.spec.node_id not in offenders])
        if new is not None:
            return new, offenders
    strategy.load_state_dict(saved)
    return state, [r.spec.node_id for r in results]
