"""Boundary values of the accounting and calibration inputs (each bound pinned on both sides)."""

import math

import pytest

from fedlora.privacy.accounting import check_delta, compute_epsilon
from fedlora.privacy.calibrate import (
    CalibrationError,
    calibrate_noise_multiplier,
    planned_steps,
    would_exceed,
)
from fedlora.privacy.ledger import LedgerEntry, PrivacyLedger

DELTA = 1e-5


@pytest.mark.parametrize("bad", [0.0, 1.0, 1.5, -0.1, "0.1"])
def test_delta_must_lie_strictly_inside_zero_one(bad):
    with pytest.raises(ValueError, match=r"^delta="):
        check_delta(bad)
    assert check_delta(0.999) == 0.999 and check_delta(1e-9) == 1e-9


def test_planned_steps_bounds_and_names():
    assert planned_steps(1, 1) == 1 and planned_steps(3, 7) == 21
    for args, name in [((0, 1), "rounds=0"), ((1, 0), "steps_per_round=0"), ((2.5, 1), "rounds=2.5")]:
        with pytest.raises(CalibrationError, match=rf"^{name} must be a positive integer"):
            planned_steps(*args)
    with pytest.raises(CalibrationError, match=r"^steps_per_round=True"):
        planned_steps(1, True)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0.0, DELTA, 0.1, 10), r"^target_epsilon=0.0 must be a finite number > 0"),
        ((math.inf, DELTA, 0.1, 10), r"^target_epsilon=inf must be a finite number > 0"),
        ((1.0, DELTA, 1.5, 10), r"^sample_rate=1.5 must lie in \(0, 1\]"),
        ((1.0, DELTA, 0.1, 2.5), r"^total_steps=2.5 must be a positive integer"),
        ((1.0, DELTA, 0.1, True), r"^total_steps=True must be a positive integer"),
    ],
)
def test_calibration_rejects_each_bound(args, message):
    with pytest.raises(CalibrationError, match=message):
        calibrate_noise_multiplier(*args, accountant="rdp")


def test_calibration_accepts_the_smallest_plan_and_full_sampling():
    sigma = calibrate_noise_multiplier(2.0, DELTA, 1.0, 1, accountant="rdp")
    assert 2.0 - 0.01 <= compute_epsilon([(sigma, 1.0, 1)], DELTA, "rdp") <= 2.0


def test_epsilon_tolerance_bounds_and_default():
    for tol in (0.0, 1.0, 2.0):
        with pytest.raises(CalibrationError, match=rf"^epsilon_tolerance={tol}"):
            calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, "rdp", epsilon_tolerance=tol)
    # Default tolerance min(0.01, target / 100): for target 0.5 the result lies within 0.005 of it.
    sigma = calibrate_noise_multiplier(0.5, DELTA, 0.1, 10, "rdp")
    assert 0.5 - 0.005 <= compute_epsilon([(sigma, 0.1, 10)], DELTA, "rdp") <= 0.5


def test_would_exceed_allows_exactly_the_target():
    ledger = PrivacyLedger("c", "record", DELTA, 1.0)
    entry = LedgerEntry(1, 1.0, 0.1, 5)
    spent = ledger.append(entry).epsilon("rdp")
    assert would_exceed(ledger, entry, spent) is False  # reaching the budget is allowed
    assert would_exceed(ledger, entry, spent * (1 - 1e-9)) is True
    assert would_exceed(ledger, LedgerEntry(1, 5.0, 0.01, 1), 0.5) is False  # targets below 1 are valid
    with pytest.raises(CalibrationError, match=r"^target_epsilon=0 must be > 0"):
        would_exceed(ledger, entry, 0)
