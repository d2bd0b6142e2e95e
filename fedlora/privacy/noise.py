"""The Gaussian mechanism without floating-point leaks: discrete Gaussian noise on a fine grid.

Adding a floating-point Gaussian sample to a floating-point sum leaks: which floats the noisy
value can take depends on the value itself (Mironov 2012 for Laplace; Jin et al. 2022,
"Are we there yet? Timing and floating-point attacks on differential privacy systems", for
Gaussian samplers including Opacus'). The principled fix (Canonne, Kamath, Steinke 2020,
"The Discrete Gaussian for Differential Privacy", CKS20) works on integers:

1. Snap the value to a grid of step ``γ`` (a power of two, so ``x / γ`` and ``γ · k`` are
   exact in float64): ``k = round(x / γ)``. Rounding each of ``d`` coordinates moves the vector
   by at most ``γ √d / 2``, so two neighbouring sums of L2 distance ``≤ C`` snap to integer
   vectors of L2 distance ``≤ C + γ √d`` (in units of ``γ``: ``Δ = (C + γ √d) / γ``).
2. Add integer noise ``Z ~ N_Z(0, σ_Z²)`` from the discrete Gaussian, drawn exactly from a
   cryptographically secure stream (:class:`fedlora.privacy.randomness.SecureRandom`), with
   ``σ_Z = σ · Δ``: the noise multiplier against the snapped sensitivity is exactly ``σ``.
3. Release ``γ · (k + Z)``, exact in float64 while ``|k + Z| < 2^53``; casting it to the
   tensor's dtype afterwards is post-processing.

The grid is chosen so that ``γ √d ≤ 2^-20 C`` (the noise grows by at most one part in a million
over the continuous mechanism's) and ``σ_Z ≥ 2^20``. CKS20 show the discrete Gaussian is at
least as private as the continuous one at the same ``σ`` for integer-valued queries (their
concentrated-DP bound); the ledger accounts it with the continuous Gaussian's analysis, which
at ``σ_Z ≥ 2^20`` differs from the discrete one's by terms of order ``exp(-2π² σ_Z²)``.

The sampler is CKS20's Algorithm 3 (rejection from a discrete Laplace, Algorithm 2),
vectorised over candidates. Every probability it uses is exact or rounded once to float64 and
compared with a 64-bit word, so each output's probability carries a relative error below
``2^-48`` for ``|Z| ≤ 12 σ_Z`` and the mass beyond is below ``10^-30``.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedlora.privacy.randomness import SecureRandom

GRID_SLACK_BITS = 20
"""The grid's rounding adds at most ``2^-20`` of the clip norm to the sensitivity."""

_EXP_MINUS = np.floor(np.ldexp(np.exp(-np.arange(1, 64, dtype=np.float64)), 64))
"""``floor(e^{-v} · 2^64)`` for v = 1..63: P(V >= v) = e^{-v} for the geometric part."""


def discrete_laplace(gen: SecureRandom, n: int, t: int) -> np.ndarray:
    """Return ``n`` draws with ``P(Y = y) ∝ exp(-|y| / t)`` (CKS20 Algorithm 2, ``s = 1``), ``int64``."""
    if t < 1:
        raise ValueError(f"t={t!r} must be a positive integer")
    thresholds = _EXP_MINUS[_EXP_MINUS > 0].astype(np.uint64)[::-1]  # ascending
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        m = int((n - len(out)) * 1.8) + 16
        u = gen.integers_below(m, t)
        keep = gen.bernoulli_exp(u / t)  # accept U with probability e^{-U/t}
        u = u[keep]
        # V ~ Geometric: P(V >= v) = e^{-v}; V = how many thresholds lie above one word.
        w = gen.words(len(u))
        v = len(thresholds) - np.searchsorted(thresholds, w, side="right")
        x = u + t * v.astype(np.int64)
        b = gen.bits(len(x))
        ok = ~(b & (x == 0))  # the sign bit: -0 is rejected so 0 is not counted twice
        out = np.concatenate([out, np.where(b, -x, x)[ok]])
    return out[:n]


def discrete_gaussian(gen: SecureRandom, n: int, sigma: float) -> np.ndarray:
    """Return ``n`` draws with ``P(Z = z) ∝ exp(-z² / (2 σ²))`` (CKS20 Algorithm 3), ``int64``.

    Raises
    ------
    ValueError
        If ``σ`` is not in ``(0, 2^44]`` (larger values would overflow exact integer arithmetic).
    """
    if not (0.0 < sigma <= 2.0**44):
        raise ValueError(f"sigma={sigma!r} must lie in (0, 2^44]")
    t = math.floor(sigma) + 1
    s2 = sigma * sigma
    out = np.empty(0, dtype=np.int64)
    while len(out) < n:
        m = int((n - len(out)) * 1.6) + 16
        y = discrete_laplace(gen, m, t)
        excess = np.abs(y).astype(np.float64) - s2 / t
        accept = gen.bernoulli_exp(excess * excess / (2.0 * s2))
        out = np.concatenate([out, y[accept]])
    return out[:n]


def grid_step(clip_norm: float, dim: int) -> float:
    """Return the power-of-two grid step ``γ`` with ``γ √dim ≤ 2^-20 · clip_norm``."""
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ValueError(f"clip_norm={clip_norm!r} must be a finite number > 0")
    if dim < 1:
        raise ValueError(f"dim={dim!r} must be >= 1")
    bound = clip_norm * 2.0**-GRID_SLACK_BITS / math.sqrt(dim)
    return 2.0 ** math.floor(math.log2(bound))


class DiscreteGaussianMechanism:
    """Adds discrete Gaussian noise of multiplier ``σ`` to sums of clip-``C`` vectors of ``dim`` coordinates.

    One instance per release stream (a client's DP-SGD round, the server's client-level DP);
    it owns its :class:`SecureRandom` (fresh 256-bit OS key unless one is given).

    Parameters
    ----------
    noise_multiplier
        σ ≥ 0; 0 releases the exact sum (no snapping, no noise).
    clip_norm
        C > 0, the L2 sensitivity of the sum before snapping.
    dim
        The total number of coordinates released per step (all tensors together); it sets
        the grid so that snapping adds at most ``2^-20 C`` to the sensitivity.
    generator
        The secure generator; ``None`` builds one from OS entropy.
    """

    def __init__(
        self, noise_multiplier: float, clip_norm: float, dim: int, generator: SecureRandom | None = None
    ) -> None:
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.gamma = grid_step(clip_norm, dim)
        self.sensitivity_units = (self.clip_norm + self.gamma * math.sqrt(dim)) / self.gamma
        self.sigma_units = self.noise_multiplier * self.sensitivity_units
        self.generator = generator if generator is not None else SecureRandom()

    @property
    def noise_std(self) -> float:
        """The standard deviation of the added noise, in the values' units (≈ σ C (1 + 2^-20))."""
        return self.sigma_units * self.gamma

    def noisy(self, value: torch.Tensor) -> torch.Tensor:
        """Return ``γ (round(value / γ) + Z)`` with the shape, dtype and device of ``value``.

        Raises
        ------
        ValueError
            If ``value`` holds NaN/inf, or a coordinate too large for exact float64 arithmetic.
        """
        if self.noise_multiplier == 0.0:
            return value.clone()
        x = value.detach().to("cpu", torch.float64)
        if not torch.isfinite(x).all():
            raise ValueError("the clipped sum holds NaN or infinite values; nothing can be released")
        k = torch.round(x / self.gamma)
        z = torch.from_numpy(discrete_gaussian(self.generator, x.numel(), self.sigma_units)).view(x.shape)
        total = k + z.to(torch.float64)
        if total.numel() and float(total.abs().max()) >= 2.0**52:
            raise ValueError(
                "a coordinate of the clipped sum is too large for exact release on the noise grid "
                f"({float(x.abs().max()):.3g} with grid {self.gamma:.3g}); lower the clip norm"
            )
        return (total * self.gamma).to(device=value.device, dtype=value.dtype)


def poisson_mask(gen: SecureRandom, n: int, rate: float) -> np.ndarray:
    """Return which of ``n`` records a Poisson sample at ``rate`` includes (``bool``, exact to 2^-64)."""
    return gen.bernoulli(rate, n)
