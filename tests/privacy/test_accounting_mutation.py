"""Accounting and calibration edges, value by value (fast: RDP only, one PRV call)."""

import math

import pytest

from fedlora.privacy.accounting import (
    ACCOUNTANTS,
    PRV_EPS_ERROR,
    check_accountant,
    check_block,
    compact_history,
    compute_epsilon,
)
from fedlora.privacy.calibrate import CalibrationError, calibrate_noise_multiplier, remaining_epsilon
from fedlora.privacy.ledger import LedgerEntry, PrivacyLedger

DELTA = 1e-5


def test_accountant_names():
    assert ACCOUNTANTS == ("rdp", "prv") and PRV_EPS_ERROR == 0.01
    assert check_accountant("prv") == "prv"
    with pytest.raises(ValueError, match=r"^accountant='RDP' is not supported; use one of \['rdp', 'prv'\]$"):
        check_accountant("RDP")


def test_check_block_canonical_types_and_messages():
    assert check_block(1, 1, 3.0) == (1.0, 1.0, 3) and type(check_block(1, 1, 3.0)[2]) is int
    assert check_block(0.0, 1e-9, 0) == (0.0, 1e-9, 0)
    cases = [
        ((math.inf, 0.1, 1), "noise_multiplier=inf must be a finite number >= 0"),
        ((-1e-9, 0.1, 1), "noise_multiplier=-1e-09 must be a finite number >= 0"),
        ((1.0, 0.0, 1), r"sample_rate=0.0 must lie in \(0, 1\] \(use 1.0 without subsampling\)"),
        ((1.0, 1.0000001, 1), "sample_rate=1.0000001 must lie in"),
        ((1.0, 0.5, -1), "steps=-1 must be a non-negative integer"),
        ((1.0, 0.5, False), "steps=False must be a non-negative integer"),
        ((1.0, 0.5, 0.5), "steps=0.5 must be a non-negative integer"),
    ]
    for args, message in cases:
        with pytest.raises(ValueError, match=f"^{message}"):
            check_block(*args)


def test_compact_history_merges_drops_empty_and_sorts():
    hist = [(2.0, 0.1, 5), (1.0, 0.2, 0), (1.0, 0.1, 3), (2.0, 0.1, 1), (1.0, 0.05, 2)]
    assert compact_history(hist) == ((1.0, 0.05, 2), (1.0, 0.1, 3), (2.0, 0.1, 6))
    assert compact_history([]) == () and compact_history([(0.0, 1.0, 0)]) == ()


def test_compute_epsilon_validates_before_the_empty_shortcut():
    assert compute_epsilon([], DELTA) == 0.0 and compute_epsilon([(1.0, 0.1, 0)], DELTA, "prv") == 0.0
    with pytest.raises(ValueError, match="accountant='gdp'"):
        compute_epsilon([], DELTA, "gdp")
    with pytest.raises(ValueError, match=r"^delta=0 must lie in \(0, 1\)"):
        compute_epsilon([], 0)
    with pytest.raises(ValueError, match="steps=-1"):
        compute_epsilon([(1.0, 0.1, -1)], DELTA)
    assert compute_epsilon([(0.0, 0.5, 1), (5.0, 0.1, 1)], DELTA) == math.inf
    assert (
        compute_epsilon([(0.0, 0.5, 0), (5.0, 0.1, 1)], DELTA) < 1.0
    )  # an empty noiseless block spends nothing


def test_prv_is_tighter_than_rdp_on_the_same_history():
    hist = [(1.0, 0.1, 20)]
    rdp, prv = compute_epsilon(hist, DELTA, "rdp"), compute_epsilon(hist, DELTA, "prv")
    assert type(rdp) is float and type(prv) is float
    assert 0 < prv < rdp


def test_a_loose_tolerance_is_passed_to_the_search():
    loose = calibrate_noise_multiplier(8.0, DELTA, 0.1, 100, "rdp", epsilon_tolerance=7.0)
    # Opacus' default tolerance (0.01) would land within 0.01 of 8; 7.0 lets the search stop early.
    assert 1.0 <= compute_epsilon([(loose, 0.1, 100)], DELTA) < 7.99


def test_calibration_error_messages():
    with pytest.raises(CalibrationError, match=r"^delta=2 must lie in \(0, 1\)"):
        calibrate_noise_multiplier(1.0, 2, 0.1, 10)
    with pytest.raises(CalibrationError, match=r"^sample_rate=0.0 must lie in \(0, 1\]$"):
        calibrate_noise_multiplier(1.0, DELTA, 0.0, 10)
    with pytest.raises(CalibrationError, match=r"^total_steps=0 must be a positive integer$"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 0)
    with pytest.raises(
        CalibrationError, match=r"^epsilon_tolerance=1.0 must lie in \(0, target_epsilon=1.0\)$"
    ):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, epsilon_tolerance=1.0)
    with pytest.raises(ValueError, match="accountant='gdp'"):
        calibrate_noise_multiplier(1.0, DELTA, 0.1, 10, "gdp")


def test_remaining_epsilon_is_the_exact_difference_floored_at_zero():
    led = PrivacyLedger("c", "record", DELTA, 1.0, (LedgerEntry(1, 1.0, 0.1, 10),))
    spent = led.epsilon("rdp")
    assert remaining_epsilon(led, spent + 2.5) == pytest.approx(2.5, abs=1e-12)
    assert remaining_epsilon(led, spent / 2) == 0.0
    assert remaining_epsilon(led, 100.0, "prv") == pytest.approx(100.0 - led.epsilon("prv"), abs=1e-12)


def test_an_unreachable_budget_names_every_way_out():
    with pytest.raises(CalibrationError) as err:
        calibrate_noise_multiplier(1e-6, DELTA, 1.0, 1000, "rdp", epsilon_tolerance=1e-8)
    text = str(err.value)
    assert text.startswith(
        "no noise multiplier up to 1e6 reaches epsilon=1e-06 at delta=1e-05 with q=1.0 over 1000 steps ("
    )
    assert text.endswith("); raise target_epsilon or delta, or take fewer steps / a smaller sample rate")
