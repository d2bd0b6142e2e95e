"""Edges of the DP-FedAvg helpers: argument bounds, float64 accumulation, sampling schemes."""

import math
import random

import numpy as np
import pytest
import torch

from fedlora.privacy.client_dp import (
    ClientDPError,
    accounted_sample_rate,
    check_client_sampling,
    expected_clients,
    noisy_mean,
    privatize_updates,
    sample_clients,
)
from fedlora.privacy.randomness import SecureRandom

K = "m.lora_B.weight"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": math.inf}, r"^noise_multiplier=inf must be a finite number >= 0"),
        ({"noise_multiplier": math.nan}, r"^noise_multiplier=nan must be a finite number >= 0"),
        ({"noise_multiplier": -1.0}, r"^noise_multiplier=-1.0 must be"),
        ({"clip_norm": 0.0}, r"^clip_norm=0.0 must be a finite number > 0"),
        ({"clip_norm": math.inf}, r"^clip_norm=inf must be a finite number > 0"),
        ({"expected_clients": 0.0}, r"^expected_clients=0.0 must be > 0"),
    ],
)
def test_noisy_mean_rejects_each_bound(kwargs, message):
    args = {"noise_multiplier": 1.0, "clip_norm": 1.0, "expected_clients": 2.0, **kwargs}
    with pytest.raises(ClientDPError, match=message):
        noisy_mean([{K: torch.zeros(2)}], **args, generator=fixed_key())


def test_noisy_mean_names_the_mismatching_tensor_and_needs_a_template():
    with pytest.raises(
        ClientDPError, match=r"update 1 names \['m.lora_B.weight', 'other'\] that the others do not"
    ):
        noisy_mean([{K: torch.zeros(2)}, {"other": torch.zeros(2)}], noise_multiplier=0.0, clip_norm=1.0,
                   expected_clients=2.0, generator=fixed_key())  # fmt: skip
    with pytest.raises(ClientDPError, match=r"^no updates and no template: pass template="):
        noisy_mean([], noise_multiplier=1.0, clip_norm=1.0, expected_clients=2.0, generator=fixed_key())


def test_sum_is_accumulated_in_float64():
    # float32 accumulation would lose the 1.0 between +1e8 and -1e8.
    ups = [{K: torch.tensor([1e8])}, {K: torch.tensor([1.0])}, {K: torch.tensor([-1e8])}]
    out = noisy_mean(ups, noise_multiplier=0.0, clip_norm=1.0, expected_clients=2.0, generator=fixed_key())
    assert out[K].dtype == torch.float32 and float(out[K]) == 0.5


def test_seeded_generator_makes_the_release_reproducible():
    ups = [{K: torch.full((64,), 0.1)}]  # norm 0.8 < C: not clipped

    def release(seed):
        return privatize_updates(ups, clip_norm=1.0, noise_multiplier=1.0, expected_clients=1.0,
                                 generator=fixed_key(seed))[0][K]  # fmt: skip

    torch.manual_seed(0)
    a = release(3)
    torch.manual_seed(1)  # the global RNG must not be what draws the noise
    assert torch.equal(a, release(3)) and not torch.equal(a, release(4))
    gen = fixed_key(3)
    args = {"clip_norm": 1.0, "noise_multiplier": 1.0, "expected_clients": 1.0}
    empty, norms = privatize_updates([], **args, template={K: torch.zeros(64)}, generator=gen)
    assert norms == [] and torch.allclose(empty[K], release(3) - 0.1, atol=1e-6)


def test_sampling_schemes_and_their_denominators():
    ids = list(range(10))
    with pytest.raises(ClientDPError, match=r"^sample_rate=0.0 must lie in \(0, 1\]"):
        sample_clients(ids, 0.0, "poisson", random.Random(0))
    with pytest.raises(ClientDPError, match=r"^sample_rate=1.5"):
        sample_clients(ids, 1.5, "fixed", random.Random(0))
    assert sample_clients(ids, 1.0, "poisson", random.Random(0)) == ids  # q = 1 keeps everyone
    assert sample_clients(ids, 1.0, "poisson", np.random.default_rng(0)) == ids
    assert sample_clients([], 0.5, "fixed", random.Random(0)) == []
    assert len(sample_clients(ids, 0.01, "fixed", random.Random(0))) == 1  # at least one client
    picked = sample_clients(ids, 0.5, "fixed", np.random.default_rng(0))
    assert len(picked) == 5 and picked == sorted(picked)
    for seed in range(20):  # distinct clients: drawn without replacement
        assert len(set(sample_clients(ids, 0.8, "fixed", np.random.default_rng(seed)))) == 8
    assert expected_clients(10, 0.25, "poisson") == 2.5 and expected_clients(10, 0.25, "fixed") == 2.0
    assert expected_clients(10, 0.01, "fixed") == 1.0 and expected_clients(1, 1.0, "poisson") == 1.0
    with pytest.raises(ClientDPError, match=r"^num_clients=0 must be >= 1"):
        expected_clients(0, 0.5, "poisson")
    with pytest.raises(ClientDPError, match=r"^method='x' must be 'poisson' or 'fixed'"):
        expected_clients(10, 0.5, "x")
    with pytest.raises(ClientDPError, match=r"^method='x'"):
        accounted_sample_rate(0.5, "x")


def test_fixed_sampling_of_a_subset_is_refused_with_the_fix():
    check_client_sampling("fixed", 0, 10)
    check_client_sampling("fixed", 10, 10)
    check_client_sampling("poisson", 3, 10)
    with pytest.raises(
        ClientDPError, match=r"clients_per_round = 3 < num_clients = 10.*client_sample_rate = 0.3"
    ):
        check_client_sampling("fixed", 3, 10)
    with pytest.raises(ClientDPError, match=r"clients_per_round = 1 < num_clients = 10"):
        check_client_sampling("fixed", 1, 10)
    with pytest.raises(ClientDPError, match=r"clients_per_round = 9 < num_clients = 10"):
        check_client_sampling("fixed", 9, 10)
    with pytest.raises(ClientDPError, match=r"^privacy.client_sampling='random' must be"):
        check_client_sampling("random", 0, 10)


def fixed_key(i: int = 7) -> SecureRandom:
    return SecureRandom(bytes([i]) * 32)  # reproducible noise, tests only
