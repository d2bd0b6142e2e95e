"""DP-FedAvg helpers, value by value: the checks that make mutation testing kill client_dp mutants.

Hand-computed results on tiny tensors; every error is matched by the text a user reads.
"""

import math
import random

import numpy as np
import pytest
import torch

from fedlora.privacy.client_dp import (
    ClientDPError,
    accounted_sample_rate,
    check_client_sampling,
    clip_update,
    expected_clients,
    noisy_mean,
    privatize_updates,
    sample_clients,
    update_norm,
)
from fedlora.privacy.noise import DiscreteGaussianMechanism
from fedlora.privacy.randomness import SecureRandom

A = "m.q.lora_A.weight"
B = "m.q.lora_B.weight"


def test_a_strategy_that_declares_nothing_is_refused_with_the_generic_reason_and_the_fix():
    from server.privacy import privatisable_names
    from strategies.base import LoraStrategy

    class Mine(LoraStrategy):  # a new strategy that says nothing about DP
        name = "mine"

        def init_state(self, template, clients):
            return dict(template)

        def payload(self, state, client):
            raise NotImplementedError

        def aggregate(self, state, results):
            return dict(state)

    with pytest.raises(
        ClientDPError,
        match=r"^client-level DP is not supported with strategy 'mine': it does not declare which of its "
        r"tensors a noisy sum of clipped updates may privatise \(LoraStrategy\.dp_tensors\)\. Use a strategy "
        r"that declares dp_tensors \(fedit, ffa\), or record-level DP on the clients instead$",
    ):
        privatisable_names(Mine, [A, B])
    Mine.dp_tensors = "no_lora_a"  # declaring it is all a strategy needs
    assert privatisable_names(Mine, [A, B]) == [B]


def test_update_norm_and_clip_by_hand():
    upd = {A: torch.tensor([3.0, 0.0]), B: torch.tensor([[4.0]])}  # joint norm 5
    assert update_norm(upd) == 5.0
    clipped, norm = clip_update(upd, 2.5)
    assert norm == 5.0
    assert torch.equal(clipped[A], torch.tensor([1.5, 0.0])) and torch.equal(
        clipped[B], torch.tensor([[2.0]])
    )
    same, _ = clip_update(upd, 5.0)  # exactly at the bound: unchanged
    assert torch.equal(same[A], upd[A]) and torch.equal(same[B], upd[B])
    with pytest.raises(
        ClientDPError, match=r"^update contains NaN or infinite values; reject it before clipping$"
    ):
        clip_update({A: torch.tensor([math.inf])}, 1.0)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ClientDPError, match=rf"^max_norm={bad!r} must be a finite number > 0$"):
            clip_update(upd, bad)


def test_noisy_mean_without_noise_is_the_sum_over_the_fixed_denominator():
    ups = [{B: torch.tensor([1.0, 2.0])}, {B: torch.tensor([3.0, -2.0])}]
    out = noisy_mean(ups, noise_multiplier=0.0, clip_norm=1.0, expected_clients=4.0, generator=fixed_key())
    assert torch.equal(out[B], torch.tensor([1.0, 0.0]))
    half = noisy_mean(ups, noise_multiplier=0.0, clip_norm=1.0, expected_clients=0.5, generator=fixed_key())
    assert torch.equal(half[B], torch.tensor([8.0, 0.0]))
    bf = noisy_mean([{B: torch.ones(2, dtype=torch.bfloat16)}], noise_multiplier=0.0, clip_norm=1.0,
                    expected_clients=1.0, generator=fixed_key())  # fmt: skip
    assert bf[B].dtype == torch.bfloat16


def test_noise_is_exactly_sigma_c_times_the_generator_draw_over_m():
    template = {B: torch.zeros(3)}
    out = noisy_mean([], noise_multiplier=2.0, clip_norm=0.5, expected_clients=4.0, template=template,
                     generator=fixed_key(5))  # fmt: skip
    # The same key gives the same discrete Gaussian draws: noise std σ C (1 + 2^-20), divided by m.
    mech = DiscreteGaussianMechanism(2.0, 0.5, 3, fixed_key(5))
    draw = mech.noisy(torch.zeros(3, dtype=torch.float64))
    assert mech.noise_std == pytest.approx(2.0 * 0.5, rel=2e-6)
    assert torch.allclose(out[B].double(), draw / 4.0, atol=1e-7)
    mean, norms = privatize_updates([{B: torch.tensor([0.0, 6.0, 8.0])}], clip_norm=5.0, noise_multiplier=0.0,
                                    expected_clients=2.0, generator=fixed_key())  # fmt: skip
    assert norms == [10.0] and torch.equal(mean[B], torch.tensor([0.0, 1.5, 2.0]))


def test_poisson_draws_with_a_numpy_generator_are_one_vector_draw():
    ids = list(range(8))
    draws = np.random.default_rng(11).random(8)
    expected = [c for c, u in zip(ids, draws, strict=True) if u < 0.5]
    assert sample_clients(ids, 0.5, "poisson", np.random.default_rng(11)) == expected
    r = random.Random(11)
    py_draws = [r.random() for _ in ids]
    assert sample_clients(ids, 0.5, "poisson", random.Random(11)) == [
        c for c, u in zip(ids, py_draws, strict=True) if u < 0.5
    ]


def test_fixed_draws_are_distinct_sorted_and_follow_the_generator():
    ids = ["a", "b", "c", "d", "e"]
    for seed in range(30):
        picked = sample_clients(ids, 0.8, "fixed", np.random.default_rng(seed))
        assert len(picked) == 4 and len(set(picked)) == 4 and picked == sorted(picked)
        again = sample_clients(ids, 0.8, "fixed", random.Random(seed))
        assert len(set(again)) == 4 and again == sorted(again)
    picked = np.random.default_rng(2).choice(5, size=2, replace=False).tolist()
    assert sample_clients(ids, 0.4, "fixed", np.random.default_rng(2)) == [ids[i] for i in sorted(picked)]
    with pytest.raises(ClientDPError, match=r"^method='fixed-size' must be 'poisson' or 'fixed'$"):
        sample_clients(ids, 0.4, "fixed-size", random.Random(0))


def test_fixed_sampling_refusal_names_both_fixes():
    check_client_sampling("fixed", 0, 3)
    check_client_sampling("fixed", 3, 3)
    with pytest.raises(ClientDPError) as err:
        check_client_sampling("fixed", 1, 4)
    assert str(err.value) == (
        "client-level DP with privacy.client_sampling = 'fixed' and federation.clients_per_round = 1 < "
        "num_clients = 4 has no sound accounting here (a fixed-size sample is not amplified like a Poisson "
        "one, and q = 1 does not bound it either). Set privacy.client_sampling = 'poisson' with "
        "privacy.client_sample_rate = 0.25 (the same expected load), or clients_per_round = 0 to train every "
        "client every round"
    )


def test_denominators_and_accounted_rates():
    assert expected_clients(4, 0.5, "poisson") == 2.0
    assert expected_clients(3, 0.5, "fixed") == 2.0 and isinstance(expected_clients(3, 0.5, "fixed"), float)
    assert expected_clients(1, 0.1, "fixed") == 1.0
    assert accounted_sample_rate(0.25, "poisson") == 0.25 and accounted_sample_rate(0.25, "fixed") == 1.0


def test_a_name_mismatch_lists_at_most_three_names():
    names = ["a.weight", "b.weight", "c.weight", "d.weight"]
    with pytest.raises(
        ClientDPError, match=r"^update 1 names \['a.weight', 'b.weight', 'c.weight'\] that the others do not$"
    ):
        noisy_mean([{B: torch.zeros(1)}, {n: torch.zeros(1) for n in [B, *names]}], noise_multiplier=0.0,
                   clip_norm=1.0, expected_clients=1.0, generator=fixed_key())  # fmt: skip


def test_noisy_mean_returns_the_updates_device_and_dtype():
    # The discrete noise is drawn on the CPU (from the secure stream) and returned where the sum lives.
    upd = {"w": torch.zeros(3, 2, dtype=torch.bfloat16)}
    out = noisy_mean([upd], noise_multiplier=1.0, clip_norm=1.0, expected_clients=1.0, generator=fixed_key())
    assert out["w"].device == upd["w"].device and out["w"].shape == (3, 2)
    assert out["w"].dtype == torch.bfloat16
    empty = noisy_mean(
        [], noise_multiplier=1.0, clip_norm=1.0, expected_clients=2.0, template=upd, generator=fixed_key()
    )
    assert empty["w"].dtype == torch.bfloat16 and bool(empty["w"].ne(0).any())


def fixed_key(i: int = 7) -> SecureRandom:
    return SecureRandom(bytes([i]) * 32)  # reproducible noise, tests only
