"""Calibration's own re-check of Opacus' σ (mutants that survived pass 1; see docs/testing.md).

Real Opacus never returns a σ above the target (its search keeps the upper end of the bracket),
so the guard is played by a stand-in for ``get_noise_multiplier`` that returns a chosen σ: the
adversary here is a wrong or changed search in the library, and the guarantee is that calibration
never hands out a σ whose ε, by fedlora's own accounting, exceeds the budget.
"""

import pytest

import fedlora.privacy.calibrate as calibrate
from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.calibrate import CalibrationError, calibrate_noise_multiplier

DELTA, Q, STEPS = 1e-5, 0.05, 100


def test_a_sigma_from_the_search_that_overspends_is_refused(monkeypatch):
    spent = compute_epsilon([(0.8, Q, STEPS)], DELTA, "rdp")
    target = spent / 2
    monkeypatch.setattr(calibrate, "get_noise_multiplier", lambda **kwargs: 0.8)
    with pytest.raises(CalibrationError) as err:
        calibrate_noise_multiplier(target, DELTA, Q, STEPS, "rdp")
    assert str(err.value) == (
        f"calibrated sigma=0.8 spends epsilon={spent} > target {target}; lower epsilon_tolerance"
    )


def test_a_sigma_that_spends_exactly_the_target_is_accepted(monkeypatch):
    # The guarantee is epsilon <= target: a sigma landing exactly on the budget is within it.
    target = compute_epsilon([(1.25, Q, STEPS)], DELTA, "rdp")
    monkeypatch.setattr(calibrate, "get_noise_multiplier", lambda **kwargs: 1.25)
    assert calibrate_noise_multiplier(target, DELTA, Q, STEPS, "rdp") == 1.25
