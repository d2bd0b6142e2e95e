"""Calibration of σ to a target (ε, δ) and the per-round budget check."""

import pytest

from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.calibrate import (
    CalibrationError,
    calibrate_noise_multiplier,
    planned_steps,
    remaining_epsilon,
    would_exceed,
)
from fedlora.privacy.ledger import LedgerEntry, PrivacyLedger

DELTA = 1e-5


@pytest.mark.parametrize(("target", "q", "steps"), [(8.0, 0.04, 2250), (1.0, 0.01, 500), (3.0, 1.0, 20)])
def test_rdp_calibration_is_tight_and_safe(target, q, steps):
    sigma = calibrate_noise_multiplier(target, DELTA, q, steps, "rdp")
    eps = compute_epsilon([(sigma, q, steps)], DELTA, "rdp")
    assert target - 0.01 <= eps <= target


def test_prv_calibration_is_tight_and_safe():
    # q = 1 keeps each PRV evaluation fast; subsampled rates are covered by the RDP cases.
    sigma = calibrate_noise_multiplier(3.0, DELTA, 1.0, 10, "prv", epsilon_tolerance=0.05)
    eps = compute_epsilon([(sigma, 1.0, 10)], DELTA, "prv")
    assert 2.95 <= eps <= 3.0
    assert eps < compute_epsilon([(sigma, 1.0, 10)], DELTA, "rdp")  # PRV is the tighter bound


def test_calibrated_run_fits_exactly_the_planned_rounds():
    rounds, per_round, q, target = 5, 100, 0.05, 4.0
    sigma = calibrate_noise_multiplier(target, DELTA, q, planned_steps(rounds, per_round))
    ledger = PrivacyLedger("c0", "record", DELTA, 1.0)
    taken = 0
    for rnd in range(1, 20):
        entry = LedgerEntry(rnd, sigma, q, per_round)
        if would_exceed(ledger, entry, target):
            break
        ledger = ledger.append(entry)
        taken += 1
    assert taken == rounds
    assert ledger.epsilon() <= target
    assert 0.0 <= remaining_epsilon(ledger, target) <= 0.01


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        ((0.0, DELTA, 0.1, 10), "target_epsilon=0.0"),
        ((1.0, 0.0, 0.1, 10), "delta=0.0"),
        ((1.0, DELTA, 0.0, 10), "sample_rate=0.0"),
        ((1.0, DELTA, 0.1, 0), "total_steps=0"),
        ((1e-7, DELTA, 1.0, 10), "raise target_epsilon"),
    ],
)
def test_impossible_or_malformed_requests_say_why(args, needle):
    with pytest.raises(CalibrationError, match=needle):
        calibrate_noise_multiplier(*args)


def test_unknown_accountant_and_bad_plan():
    with pytest.raises(ValueError, match="accountant='gdp'"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, "gdp")
    with pytest.raises(CalibrationError, match="rounds=0"):
        planned_steps(0, 10)
    with pytest.raises(CalibrationError, match="target_epsilon=-1"):
        would_exceed(PrivacyLedger("c", "record", DELTA, 1.0), LedgerEntry(1, 1.0, 0.1, 1), -1)
