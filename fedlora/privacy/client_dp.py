"""Client-level DP-FedAvg: clip each client's update, add Gaussian noise to the sum, divide.

DP-FedAvg (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private
Recurrent Language Models"): each round the server samples clients, clips every client's
update ``Δ_k`` (all its tensors together) to L2 norm ``C``, and releases

    Δ̂ = (Σ_k clip(Δ_k, C) + N(0, σ² C² I)) / m

(the Gaussian is discrete, on a grid 2^20 times finer than C / √d: :mod:`fedlora.privacy.noise`)

where ``m`` is a FIXED denominator: the expected number of participants ``q · K`` under
Poisson sampling (McMahan et al.'s unbiased fixed-denominator estimator; dividing by the
realised count would make the denominator, and so the sensitivity, data-dependent), or
``K`` when every client takes part in every round. Adding or removing one client changes
the clipped sum by at most ``C``, so this is the sampled Gaussian mechanism that
:mod:`fedlora.privacy.accounting` accounts, one step per round (released every round, even
with no participant), with ``q`` the Poisson client rate, or ``q = 1`` with every client.
Fixed-size sampling of a subset is refused (:func:`check_client_sampling`).

The noise generator (a 256-bit-key :class:`~fedlora.privacy.randomness.SecureRandom`) and the
sampling RNG (the OS CSPRNG) come from OS entropy on the server, never from a seed the
clients know. Which tensors a
strategy lets the noisy sum privatise is its own declaration (``LoraStrategy.dp_tensors``, and
``dp_refusal`` when it declares none), read by ``server.privacy.ClientLevelDP``.

Every client weighs the same: weighting by example counts would let one client's weight
(and so its influence) exceed ``C``.

"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from typing import Literal, TypeVar

import numpy as np
import torch

from fedlora.adapters import AdapterState
from fedlora.privacy.noise import DiscreteGaussianMechanism
from fedlora.privacy.randomness import SecureRandom

ClientSampling = Literal["poisson", "fixed"]
T = TypeVar("T")


class ClientDPError(ValueError):
    """Client-level DP cannot be applied as requested."""


def update_norm(update: Mapping[str, torch.Tensor]) -> float:
    """Return the L2 norm of all tensors of ``update`` taken together (float64 accumulation)."""
    total = sum(float(t.detach().double().pow(2).sum()) for t in update.values())
    return math.sqrt(total)


def clip_update(update: Mapping[str, torch.Tensor], max_norm: float) -> tuple[AdapterState, float]:
    """Scale ``update`` so its joint L2 norm is at most ``max_norm``.

    Returns
    -------
    clipped, norm
        A new dict ``update * min(1, C / ||update||)`` and the norm before clipping. A zero
        update is returned unchanged (a no-op, never NaN).

    Raises
    ------
    ClientDPError
        If ``max_norm`` is not positive or the update holds a non-finite value.
    """
    if not (max_norm > 0 and math.isfinite(max_norm)):
        raise ClientDPError(f"max_norm={max_norm!r} must be a finite number > 0")
    norm = update_norm(update)
    if not math.isfinite(norm):
        raise ClientDPError("update contains NaN or infinite values; reject it before clipping")
    factor = 1.0 if norm <= max_norm else max_norm / norm
    return {k: v * factor for k, v in update.items()}, norm


def noisy_mean(
    clipped: Sequence[Mapping[str, torch.Tensor]],
    *,
    noise_multiplier: float,
    clip_norm: float,
    expected_clients: float,
    generator: SecureRandom,
    template: Mapping[str, torch.Tensor] | None = None,
) -> AdapterState:
    """Return ``(Σ clipped + Gaussian noise of std σ C) / expected_clients`` per tensor.

    The noise is discrete Gaussian on a fine grid over all tensors together
    (:class:`fedlora.privacy.noise.DiscreteGaussianMechanism`, noise std ``σ C (1 + 2^-20)``),
    drawn from ``generator``; there is deliberately no default generator.

    Parameters
    ----------
    clipped
        Updates already clipped to ``clip_norm`` (see :func:`clip_update`); may be empty
        under Poisson sampling, in which case the result is noise only.
    noise_multiplier
        σ ≥ 0.
    clip_norm
        C > 0: the sensitivity of the sum.
    expected_clients
        The fixed denominator ``m``: ``q · K`` for Poisson sampling, the chosen count for
        fixed-size sampling (module docstring).
    generator
        The secure generator of the noise (:class:`fedlora.privacy.randomness.SecureRandom`,
        keyed from OS entropy on the party that adds the noise).
    template
        Names, shapes and dtypes of the result when ``clipped`` is empty.
    """
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ClientDPError(f"noise_multiplier={noise_multiplier!r} must be a finite number >= 0")
    if not (clip_norm > 0 and math.isfinite(clip_norm)):
        raise ClientDPError(f"clip_norm={clip_norm!r} must be a finite number > 0")
    if not (expected_clients > 0):
        raise ClientDPError(f"expected_clients={expected_clients!r} must be > 0 (q * number of clients)")
    ref = clipped[0] if clipped else template
    if ref is None:
        raise ClientDPError("no updates and no template: pass template= to release a noise-only round")
    for i, upd in enumerate(clipped):
        if set(upd) != set(ref):
            raise ClientDPError(f"update {i} names {sorted(set(upd) ^ set(ref))[:3]} that the others do not")
    if not isinstance(generator, SecureRandom):
        raise ClientDPError("noisy_mean needs a SecureRandom generator (fedlora.privacy.randomness)")
    dim = sum(like.numel() for like in ref.values())
    mechanism = DiscreteGaussianMechanism(noise_multiplier, clip_norm, max(1, dim), generator)
    out: AdapterState = {}
    for name, like in ref.items():
        acc = torch.zeros_like(like, dtype=torch.float64)
        for upd in clipped:
            acc += upd[name].double()
        out[name] = (mechanism.noisy(acc) / float(expected_clients)).to(like.dtype)
    return out


def sample_clients(
    client_ids: Sequence[T],
    sample_rate: float,
    method: ClientSampling,
    rng: np.random.Generator | random.Random,
) -> list[T]:
    """Return the clients taking part in one round, in their input order.

    ``"poisson"`` includes each client independently with probability ``q`` (the result
    may be empty); ``"fixed"`` draws ``max(1, round(q · K))`` distinct clients uniformly.
    ``rng`` is a numpy ``Generator`` or a ``random.Random``; seed it from (run seed, round),
    or checkpoint it, for reproducible schedules.
    """
    if not (0.0 < sample_rate <= 1.0):
        raise ClientDPError(f"sample_rate={sample_rate!r} must lie in (0, 1]")
    ids = list(client_ids)
    if method == "poisson":
        draws = rng.random(len(ids)) if isinstance(rng, np.random.Generator) else [rng.random() for _ in ids]
        return [c for c, u in zip(ids, draws, strict=True) if u < sample_rate]
    if method == "fixed":
        if not ids:
            return []
        m = max(1, round(sample_rate * len(ids)))
        if isinstance(rng, np.random.Generator):
            picked = rng.choice(len(ids), size=m, replace=False).tolist()
        else:
            picked = rng.sample(range(len(ids)), m)
        return [ids[i] for i in sorted(picked)]
    raise ClientDPError(f"method={method!r} must be 'poisson' or 'fixed'")


def check_client_sampling(method: str, clients_per_round: int, num_clients: int) -> None:
    """Refuse client sampling that the ledger cannot account soundly.

    Fixed-size sampling of ``k < N`` clients per round is neither Poisson sampling (whose
    amplification the accountant computes) nor covered by accounting ``q = 1`` at
    sensitivity ``C``: under add/remove, a fixed-size sample of a neighbouring population
    can differ in two clients (one swapped for another), which ``q = 1`` does not bound.
    Fixed-size sampling is therefore allowed only with every client in every round
    (``clients_per_round`` 0 or ``N``), where it is exactly ``q = 1``.

    Raises
    ------
    ClientDPError
        For ``method = "fixed"`` with ``0 < clients_per_round < num_clients``, naming the fix.
    """
    if method not in ("poisson", "fixed"):
        raise ClientDPError(f"privacy.client_sampling={method!r} must be 'poisson' or 'fixed'")
    if method == "fixed" and 0 < clients_per_round < num_clients:
        raise ClientDPError(
            f"client-level DP with privacy.client_sampling = 'fixed' and federation.clients_per_round = "
            f"{clients_per_round} < num_clients = {num_clients} has no sound accounting here (a fixed-size "
            "sample is not amplified like a Poisson one, and q = 1 does not bound it either). Set "
            f"privacy.client_sampling = 'poisson' with privacy.client_sample_rate = "
            f"{clients_per_round / num_clients:g} (the same expected load), or clients_per_round = 0 to "
            "train every client every round"
        )


def expected_clients(num_clients: int, sample_rate: float, method: ClientSampling) -> float:
    """Return the fixed denominator ``m`` of :func:`noisy_mean` for this sampling scheme."""
    if num_clients < 1:
        raise ClientDPError(f"num_clients={num_clients!r} must be >= 1")
    if method == "poisson":
        return sample_rate * num_clients
    if method == "fixed":
        return float(max(1, round(sample_rate * num_clients)))
    raise ClientDPError(f"method={method!r} must be 'poisson' or 'fixed'")


def accounted_sample_rate(sample_rate: float, method: ClientSampling) -> float:
    """Return the q to account with: ``sample_rate`` for Poisson, 1.0 for fixed-size (no amplification)."""
    if method not in ("poisson", "fixed"):
        raise ClientDPError(f"method={method!r} must be 'poisson' or 'fixed'")
    return float(sample_rate) if method == "poisson" else 1.0


def privatize_updates(
    updates: Sequence[Mapping[str, torch.Tensor]],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: SecureRandom,
    template: Mapping[str, torch.Tensor] | None = None,
) -> tuple[AdapterState, list[float]]:
    """Clip every update to ``clip_norm`` and return the noisy mean and the pre-clip norms.

    One DP-FedAvg release (module docstring); the caller records one ledger step per call.
    """
    clipped, norms = [], []
    for upd in updates:
        c, n = clip_update(upd, clip_norm)
        clipped.append(c)
        norms.append(n)
    mean = noisy_mean(
        clipped,
        noise_multiplier=noise_multiplier,
        clip_norm=clip_norm,
        expected_clients=expected_clients,
        template=template,
        generator=generator,
    )
    return mean, norms
