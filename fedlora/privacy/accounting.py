"""ε(δ) of a composed, Poisson-subsampled Gaussian mechanism, from Opacus' accountants.

The mechanism is the one DP-SGD (Abadi et al. 2016, "Deep Learning with Differential
Privacy") and DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models") both use: each step samples every unit (record or client) independently
with probability ``q``, clips each unit's contribution to L2 norm ``C`` and adds Gaussian
noise of standard deviation ``sigma * C``. Its privacy loss over a history of
``(sigma, q, steps)`` blocks is computed by one of two Opacus accountants:

``"rdp"``
    Rényi DP of the sampled Gaussian mechanism (Mironov 2017, "Rényi Differential
    Privacy"; Mironov, Talwar & Zhang 2019), converted to (ε, δ) over Opacus' default
    orders. An upper bound, fast (milliseconds).
``"prv"``
    Privacy loss random variables composed numerically (Gopi, Lee & Wutschitz 2021,
    "Numerical Composition of Differential Privacy"). Opacus returns the upper end of its
    error interval (``eps_error=0.01``), so the value is still a guarantee; it is tighter
    than RDP and slower (about a second per call).

Composition is commutative, so blocks with the same ``(sigma, q)`` are merged before
accounting (:func:`compact_history`); a history split across rounds therefore gives exactly
the ε of one block with the summed steps.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable
from typing import Literal

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as privacy_analysis

AccountantName = Literal["rdp", "prv"]
ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
PRV_EPS_ERROR = 0.01
"""Width of the error interval Opacus' PRV accountant works to (its upper end is reported)."""

HistoryBlock = tuple[float, float, int]
"""``(noise_multiplier, sample_rate, steps)`` as Opacus' accountants take it."""


def check_accountant(name: str) -> AccountantName:
    """Return ``name`` if it names a supported accountant.

    Raises
    ------
    ValueError
        If ``name`` is not one of :data:`ACCOUNTANTS`.
    """
    if name not in ACCOUNTANTS:
        raise ValueError(f"accountant={name!r} is not supported; use one of {list(ACCOUNTANTS)}")
    return name  # type: ignore[return-value]


def check_delta(delta: float) -> float:
    """Return ``delta`` as a float if ``0 < delta < 1``.

    Raises
    ------
    ValueError
        If ``delta`` is outside the open interval (0, 1).
    """
    if not (isinstance(delta, int | float) and 0.0 < float(delta) < 1.0):
        raise ValueError(f"delta={delta!r} must lie in (0, 1); a common choice is below 1/N for N units")
    return float(delta)


def check_block(noise_multiplier: float, sample_rate: float, steps: int) -> HistoryBlock:
    """Validate one ``(sigma, q, steps)`` block and return it with canonical types.

    Raises
    ------
    ValueError
        If ``noise_multiplier < 0``, ``sample_rate`` is outside (0, 1], or ``steps`` is not
        a non-negative integer.
    """
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(sigma) and sigma >= 0.0):
        raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not (0.0 < q <= 1.0):
        raise ValueError(f"sample_rate={sample_rate!r} must lie in (0, 1] (use 1.0 without subsampling)")
    if isinstance(steps, bool) or int(steps) != steps or steps < 0:
        raise ValueError(f"steps={steps!r} must be a non-negative integer")
    return sigma, q, int(steps)


def compact_history(history: Iterable[HistoryBlock]) -> tuple[HistoryBlock, ...]:
    """Merge blocks with equal ``(sigma, q)``, drop empty ones, and sort.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` blocks in any order.

    Returns
    -------
    tuple of HistoryBlock
        One block per distinct ``(sigma, q)`` with the summed steps, sorted, steps > 0.
    """
    merged: dict[tuple[float, float], int] = {}
    for block in history:
        sigma, q, steps = check_block(*block)
        if steps:
            merged[(sigma, q)] = merged.get((sigma, q), 0) + steps
    return tuple((s, q, n) for (s, q), n in sorted(merged.items()))


def compute_epsilon(history: Iterable[HistoryBlock], delta: float, accountant: str = "rdp") -> float:
    """Return ε at ``delta`` for the composition of every block in ``history``.

    Parameters
    ----------
    history
        ``(noise_multiplier, sample_rate, steps)`` blocks: the WHOLE history so far, never
        one round alone.
    delta
        Target δ in (0, 1).
    accountant
        ``"rdp"`` or ``"prv"`` (see module docstring).

    Returns
    -------
    float
        ε ≥ 0; ``0.0`` for an empty history and ``inf`` if any block has no noise.
    """
    return _composed(history, delta, check_accountant(accountant))


def _composed(history: Iterable[HistoryBlock], delta: float, analysis: str) -> float:
    """Return ε of ``history`` by ``analysis`` (an accountant, or ``"replace-one"``), with the edge cases."""
    delta = check_delta(delta)
    blocks = compact_history(history)
    if not blocks:
        return 0.0
    if any(sigma == 0.0 for sigma, _, _ in blocks):
        return math.inf
    return _epsilon_cached(blocks, delta, analysis)


@functools.lru_cache(maxsize=4096)
def _epsilon_cached(blocks: tuple[HistoryBlock, ...], delta: float, accountant: str) -> float:
    # Clients with identical histories are common (same σ, q, steps each round): cache.
    if accountant == "rdp":
        return rdp_epsilon(rdp_total(blocks), delta)
    if accountant == "replace-one":
        total = sum((n * rdp_replace_one_per_step(s, q) for s, q, n in blocks), np.zeros(len(RDP_ORDERS)))
        return rdp_epsilon(total, delta)
    acc = PRVAccountant()
    acc.history = list(blocks)
    with np.errstate(divide="ignore"):  # log(0) at q = 1 is handled inside Opacus' PRV
        return float(acc.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))


RDP_ORDERS: tuple[float, ...] = tuple(RDPAccountant.DEFAULT_ALPHAS)
"""The Rényi orders Opacus' RDP accountant optimises over."""


@functools.lru_cache(maxsize=8192)
def rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Return the RDP of ONE step of the sampled Gaussian at every order of :data:`RDP_ORDERS`.

    Opacus' ``compute_rdp(q, σ, steps, orders)`` is ``steps`` times this vector, so a history's
    RDP is a weighted sum of cached vectors: each distinct ``(σ, q)`` is analysed once per
    process, however many rounds or ledgers repeat it.
    """
    vec = privacy_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    out = np.asarray(vec, dtype=np.float64)
    out.setflags(write=False)
    return out


def rdp_total(history: Iterable[HistoryBlock]) -> np.ndarray:
    """Return the composed RDP of ``history`` at every order (the sum over blocks of steps x per-step RDP)."""
    total = np.zeros(len(RDP_ORDERS))
    for sigma, q, steps in history:
        if steps:
            total = total + steps * rdp_per_step(float(sigma), float(q))
    return total


def rdp_epsilon(rdp: np.ndarray, delta: float) -> float:
    """Return ε at ``delta`` from a composed RDP vector (Opacus' conversion, best order)."""
    if not np.any(rdp):
        return 0.0
    eps, _ = privacy_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=rdp, delta=delta)
    return float(eps)


# -- replace-one (substitution) neighbours --------------------------------------------------------


@functools.lru_cache(maxsize=1024)
def rdp_replace_one_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """Return the RDP of one Poisson-subsampled Gaussian step under REPLACE-one, at every order.

    Replacing record ``x`` by ``x'`` keeps the dataset size; ``x`` and ``x'`` share one inclusion
    coin, so the worst case is the pair (in units of ``C``, noise std ``σ``)

        P = (1 - q) N(0, σ²) + q N(+1, σ²),    Q = (1 - q) N(0, σ²) + q N(-1, σ²)

    (Lebeda, Regehr, Kamath & Steinke 2024, "Avoiding Pitfalls for Privacy Accounting of
    Subsampled Mechanisms under Composition"; for small ``q`` it is about twice the add/remove
    value). ``D_α(P || Q) = log ∫ p^α q^(1-α) / (α - 1)`` is integrated numerically in log space
    on a grid of step ``σ / 200`` that covers the integrand's mass (its peak moves to about
    ``x = α``); the pair is symmetric, so ``D_α(Q || P)`` is the same. At ``q = 1`` it is
    ``2 α / σ²``, the Gaussian mechanism at sensitivity ``2 C``.
    """
    sigma, q = float(noise_multiplier), float(sample_rate)
    if sigma == 0.0:
        return np.full(len(RDP_ORDERS), np.inf)
    out = np.empty(len(RDP_ORDERS))
    for i, alpha in enumerate(RDP_ORDERS):
        lo, hi = -14.0 * sigma - 2.0, 2.0 * alpha + 14.0 * sigma + 2.0
        x = np.linspace(lo, hi, int((hi - lo) / (sigma / 200.0)) + 2)

        def log_normal(mean: float, x: np.ndarray = x) -> np.ndarray:
            return -((x - mean) ** 2) / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2)

        if q >= 1.0:
            lp, lq = log_normal(1.0), log_normal(-1.0)
        else:
            lp = np.logaddexp(math.log1p(-q) + log_normal(0.0), math.log(q) + log_normal(1.0))
            lq = np.logaddexp(math.log1p(-q) + log_normal(0.0), math.log(q) + log_normal(-1.0))
        f = alpha * lp + (1.0 - alpha) * lq
        log_integral = float(np.logaddexp.reduce(f)) + math.log(x[1] - x[0])
        out[i] = max(0.0, log_integral) / (alpha - 1.0) + 1e-9  # + a margin for the quadrature
    out.setflags(write=False)
    return out


def replace_one_epsilon(history: Iterable[HistoryBlock], delta: float) -> float:
    """Return ε at ``delta`` for ``history`` when neighbours REPLACE one unit (the data size is public).

    RDP of the substitution pair (:func:`rdp_replace_one_per_step`), composed over the blocks
    and converted as Opacus converts RDP. Use it where the size of the dataset is disclosed,
    under which adding or removing a unit is distinguishable outright.
    """
    return _composed(history, delta, "replace-one")
