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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mechanism_at_half_the_claimed_noise_is_flagged(seed, capsys):
    # Missed in 3 of 3 seeds by the lower bound alone (it cannot reach the accounted ε here); the
    # white-box noise check on the excluded canaries catches it.
    res = audit_dpsgd(seed=seed, noise_scale=0.5, accountant="rdp")
    assert res.epsilon_lower_bound < res.epsilon_accounted  # the bound alone would say "consistent"
    assert res.noise_too_small and res.violation and res.noise_ratio == pytest.approx(0.5, abs=0.06)
    assert main(["audit-dp", "--seed", str(seed), "--noise-scale", "0.5", "--accountant", "rdp"]) == 3
    assert "adds less noise than the ledger accounts" in capsys.readouterr().out


def test_the_sound_mechanism_passes_the_noise_check():
    for seed in range(4):
        res = audit_dpsgd(seed=seed, accountant="rdp")
        assert not res.noise_too_small and res.noise_ratio == pytest.approx(1.0, abs=0.08)


def test_a_claim_above_the_audits_ceiling_is_inconclusive_not_consistent(capsys):
    # σ = 1 claims ε ≈ 4.7 at 4 steps; 200 guesses can prove at most ≈ 4.17.
    res = audit_dpsgd(seed=0, noise_multiplier=1.0, accountant="rdp")
    assert res.inconclusive and res.ceiling == pytest.approx(epsilon_lower_bound(1000, 200, 200, 1e-5))
    assert main(["audit-dp", "--seed", "0", "--noise-multiplier", "1", "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "inconclusive" in out and "consistent" not in out.split("inconclusive")[1][:10]


def test_a_real_client_round_adds_the_noise_its_ledger_records(capsys):
    # The client's DP path (calibration, PEFT MiniLM, train_local, make_private_lora), measured around
    # the optimiser's noise step; a round at 90% of the recorded σ is caught.
    from fedlora.audit import audit_client_round

    sound = audit_client_round(steps=2)
    assert not sound.violation and sound.noise_ratio == pytest.approx(1.0, abs=0.01)
    assert sound.coordinates > 50_000
    weak = audit_client_round(steps=2, noise_scale=0.9)
    assert weak.violation and weak.noise_ratio == pytest.approx(0.9, abs=0.01)
    assert main(["audit-dp", "--client-round", "--noise-scale", "0.5"]) == 3
    assert "VIOLATION: the client round added" in capsys.readouterr().out
