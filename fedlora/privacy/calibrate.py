"""Choose σ for a target (ε, δ), and decide whether one more round fits the budget.

σ is calibrated once, for the WHOLE planned run: given the sampling rate ``q`` and the
total number of noisy steps the party may take over all rounds, Opacus'
``get_noise_multiplier`` binary-searches the smallest σ (to its tolerance) whose composed
ε (RDP: Mironov 2017; PRV: Gopi et al. 2021) does not exceed the target. The same
function serves record-level DP-SGD (Abadi et al. 2016: steps = optimizer steps over all
rounds) and client-level DP-FedAvg (McMahan et al. 2018: steps = rounds, q = client rate).

The result is a guarantee only if the run then takes no more steps than planned; a client
that could overrun checks :func:`would_exceed` before each round and declines instead.
"""

from __future__ import annotations

import math

from opacus.accountants.utils import get_noise_multiplier

from fedlora.privacy.accounting import (
    PRV_EPS_ERROR,
    check_accountant,
    check_delta,
    compute_epsilon,
)
from fedlora.privacy.ledger import LedgerEntry, PrivacyLedger


class CalibrationError(ValueError):
    """No noise multiplier reaches the requested budget, or the request is malformed."""


def planned_steps(rounds: int, steps_per_round: int) -> int:
    """Return the total steps of a plan of ``rounds`` rounds of ``steps_per_round`` steps.

    For record-level DP-SGD, ``steps_per_round = local_epochs * ceil(1 / q)`` is the usual
    choice (one epoch is ``1 / q`` Poisson batches in expectation).
    """
    for name, value in (("rounds", rounds), ("steps_per_round", steps_per_round)):
        if isinstance(value, bool) or int(value) != value or value < 1:
            raise CalibrationError(f"{name}={value!r} must be a positive integer")
    return int(rounds) * int(steps_per_round)


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    total_steps: int,
    accountant: str = "rdp",
    epsilon_tolerance: float | None = None,
) -> float:
    """Return σ such that ``total_steps`` steps at rate ``sample_rate`` spend at most ``target_epsilon``.

    Parameters
    ----------
    target_epsilon
        ε budget for the whole run (> 0).
    delta
        δ of the guarantee, in (0, 1).
    sample_rate
        q in (0, 1]: the Poisson rate (use 1.0 for fixed-size sampling, which earns no
        amplification).
    total_steps
        Every noisy step the party may take over all rounds (≥ 1).
    accountant
        ``"rdp"`` or ``"prv"``; report ε with the same accountant.
    epsilon_tolerance
        The returned σ gives ``target - tolerance <= ε <= target``; default
        ``min(0.01, target_epsilon / 100)``.

    Returns
    -------
    float
        The noise multiplier σ.

    Raises
    ------
    CalibrationError
        If an argument is out of range, or no σ ≤ 1e6 reaches the target.
    """
    name = check_accountant(accountant)
    try:
        delta = check_delta(delta)
    except ValueError as e:
        raise CalibrationError(str(e)) from None
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise CalibrationError(f"target_epsilon={target_epsilon!r} must be a finite number > 0")
    if not (0.0 < sample_rate <= 1.0):
        raise CalibrationError(f"sample_rate={sample_rate!r} must lie in (0, 1]")
    if isinstance(total_steps, bool) or int(total_steps) != total_steps or total_steps < 1:
        raise CalibrationError(f"total_steps={total_steps!r} must be a positive integer")
    if epsilon_tolerance is None:
        epsilon_tolerance = min(0.01, target_epsilon / 100)
    if not (0.0 < epsilon_tolerance < target_epsilon):
        raise CalibrationError(
            f"epsilon_tolerance={epsilon_tolerance!r} must lie in (0, target_epsilon={target_epsilon})"
        )
    kwargs = {"eps_error": PRV_EPS_ERROR} if name == "prv" else {}
    try:
        sigma = get_noise_multiplier(
            target_epsilon=float(target_epsilon),
            target_delta=delta,
            sample_rate=float(sample_rate),
            steps=int(total_steps),
            accountant=name,
            epsilon_tolerance=float(epsilon_tolerance),
            **kwargs,
        )
    except ValueError as e:
        raise CalibrationError(
            f"no noise multiplier up to 1e6 reaches epsilon={target_epsilon} at delta={delta} with "
            f"q={sample_rate} over {total_steps} steps ({e}); raise target_epsilon or delta, or take "
            "fewer steps / a smaller sample rate"
        ) from None
    sigma = float(sigma)
    # Opacus returns the upper end of its search bracket; re-check with our own accounting.
    spent = compute_epsilon([(sigma, float(sample_rate), int(total_steps))], delta, name)
    if spent > target_epsilon:
        raise CalibrationError(
            f"calibrated sigma={sigma} spends epsilon={spent} > target {target_epsilon}; "
            "lower epsilon_tolerance"
        )
    return sigma


def would_exceed(
    ledger: PrivacyLedger, next_entry: LedgerEntry, target_epsilon: float, accountant: str = "rdp"
) -> bool:
    """Return True if recording ``next_entry`` would push the ledger's ε above ``target_epsilon``.

    The ε is computed from the whole history plus the candidate round at the ledger's δ,
    so a client calls this before training and declines the round when it returns True.

    Raises
    ------
    LedgerError
        If ``next_entry`` cannot follow the ledger (its round is not later).
    CalibrationError
        If ``target_epsilon`` is not a positive number.
    """
    if not (target_epsilon > 0):
        raise CalibrationError(f"target_epsilon={target_epsilon!r} must be > 0")
    # Bounded cost: a ledger of many distinct (σ, q) pairs is judged by RDP, an upper bound on PRV
    # (conservative: such a client may decline a round PRV would have allowed).
    return ledger.append(next_entry).live_epsilon(accountant)[0] > target_epsilon


def remaining_epsilon(ledger: PrivacyLedger, target_epsilon: float, accountant: str = "rdp") -> float:
    """Return ``target_epsilon - ε(ledger)``, floored at 0 (budget left, for logs and reports)."""
    return max(0.0, float(target_epsilon) - ledger.epsilon(accountant))
