"""``fedlora audit-dp``: one-run auditing (Steinke, Nasr & Jagielski 2023) of fedlora's DP-SGD."""

import math

import pytest

from fedlora.audit import audit_dpsgd, epsilon_lower_bound, p_value
from fedlora.cli import main


def test_p_value_is_the_randomised_response_tail():
    # At ε = 0 and δ = 0 every guess is a fair coin: r of r correct has probability 2^-r.
    assert p_value(100, 10, 10, 0.0, 0.0) == pytest.approx(0.5**10)
    # Larger ε makes the same observation likelier; δ only adds.
    assert p_value(100, 10, 8, 2.0, 0.0) > p_value(100, 10, 8, 0.5, 0.0)
    assert p_value(100, 10, 8, 1.0, 1e-3) >= p_value(100, 10, 8, 1.0, 0.0)
    # 200 of 200 correct rules out ε-DP up to ln(q / (1 - q)) with q^200 = 0.05.
    q = 0.05 ** (1 / 200)
    assert epsilon_lower_bound(1000, 200, 200, 0.0) == pytest.approx(math.log(q / (1 - q)), rel=1e-3)
    assert epsilon_lower_bound(1000, 200, 100, 1e-5) == 0.0  # chance-level guessing proves nothing


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_lower_bound_stays_below_the_accounted_epsilon(seed):
    res = audit_dpsgd(canaries=1000, guesses=100, noise_multiplier=4.0, steps=4, seed=seed, accountant="rdp")
    assert not res.violation and 0.0 <= res.epsilon_lower_bound < res.epsilon_accounted


def test_a_mechanism_with_the_noise_off_is_caught(capsys):
    res = audit_dpsgd(canaries=1000, guesses=100, noise_multiplier=4.0, steps=4, seed=0, noise_off=True)
    assert res.correct == res.guesses  # without noise every canary is found
    assert res.violation and res.epsilon_lower_bound > 4.0 > res.epsilon_accounted
    assert main(["audit-dp", "--noise-off", "--seed", "0"]) == 3
    assert "VIOLATION" in capsys.readouterr().out
