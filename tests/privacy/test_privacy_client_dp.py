"""Client-level DP-FedAvg math: clipping, noise statistics, sampling, strategy support."""

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.privacy.client_dp import (
    ClientDPError,
    accounted_sample_rate,
    clip_update,
    expected_clients,
    noisy_mean,
    privatize_updates,
    sample_clients,
    update_norm,
)
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.randomness import SecureRandom

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
HEAD = "base_model.model.classifier.weight"


def update(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {
        A: scale * torch.randn(4, 8, generator=g),
        B: scale * torch.randn(8, 4, generator=g),
        HEAD: scale * torch.randn(2, 8, generator=g),
    }


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(1e-6, 1e3), clip=st.floats(1e-3, 1e2))
def test_clip_bound_property(seed, scale, clip):
    upd = update(seed, scale)
    clipped, norm = clip_update(upd, clip)
    assert norm == pytest.approx(update_norm(upd))
    assert update_norm(clipped) <= clip * (1 + 1e-6)
    if norm <= clip:
        assert all(torch.equal(clipped[k], upd[k]) for k in upd)
    else:
        assert update_norm(clipped) == pytest.approx(clip, rel=1e-5)
        factor = clipped[B] / upd[B]  # direction kept: one common positive factor
        assert torch.allclose(factor, factor.flatten()[0].expand_as(factor), rtol=1e-4)
    assert set(clipped) == set(upd) and all(clipped[k] is not upd[k] for k in upd)


def test_zero_update_is_a_no_op_and_nan_is_refused():
    zero = {k: torch.zeros_like(v) for k, v in update(0).items()}
    clipped, norm = clip_update(zero, 1.0)
    assert norm == 0.0 and all(torch.equal(clipped[k], zero[k]) for k in zero)
    bad = update(0)
    bad[B][0, 0] = float("nan")
    with pytest.raises(ClientDPError, match="NaN"):
        clip_update(bad, 1.0)
    with pytest.raises(ClientDPError, match="max_norm=0"):
        clip_update(update(0), 0)


def test_noise_std_is_sigma_c_over_m():
    sigma, clip, m = 1.3, 0.7, 5.0
    zeros = [{k: torch.zeros(64, 64) for k in (A, B)} for _ in range(3)]
    out = noisy_mean(
        zeros,
        noise_multiplier=sigma,
        clip_norm=clip,
        expected_clients=m,
        generator=fixed_key(0),
    )
    draws = torch.cat([v.flatten() for v in out.values()])  # 8192 independent draws
    assert float(draws.std()) == pytest.approx(sigma * clip / m, rel=0.03)
    assert abs(float(draws.mean())) < 4 * sigma * clip / m / draws.numel() ** 0.5


def test_noiseless_mean_and_sensitivity():
    ups = [clip_update(update(s, 10.0), 1.0)[0] for s in range(4)]
    full = noisy_mean(ups, noise_multiplier=0.0, clip_norm=1.0, expected_clients=4.0, generator=fixed_key())
    for k in full:
        assert torch.allclose(full[k], sum(u[k] for u in ups) / 4.0, atol=1e-6)
    # Removing one client moves the (un-normalised) sum by at most C.
    less = noisy_mean(
        ups[:3], noise_multiplier=0.0, clip_norm=1.0, expected_clients=1.0, generator=fixed_key()
    )
    assert update_norm({k: 4.0 * full[k] - less[k] for k in full}) <= 1.0 + 1e-5


def test_empty_round_releases_noise_only():
    tmpl = update(0)
    out = noisy_mean(
        [],
        noise_multiplier=1.0,
        clip_norm=1.0,
        expected_clients=2.0,
        template=tmpl,
        generator=fixed_key(1),
    )
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in tmpl.items()}
    with pytest.raises(ClientDPError, match="template="):
        noisy_mean([], noise_multiplier=1.0, clip_norm=1.0, expected_clients=2.0, generator=fixed_key())
    with pytest.raises(ClientDPError, match="expected_clients=0"):
        noisy_mean([tmpl], noise_multiplier=1.0, clip_norm=1.0, expected_clients=0, generator=fixed_key())
    with pytest.raises(ClientDPError, match="update 1"):
        noisy_mean(
            [tmpl, {A: tmpl[A]}],
            noise_multiplier=1.0,
            clip_norm=1.0,
            expected_clients=2,
            generator=fixed_key(),
        )


def test_privatize_updates_reports_pre_clip_norms():
    ups = [update(1, 5.0), update(2, 1e-4)]
    mean, norms = privatize_updates(
        ups, clip_norm=1.0, noise_multiplier=0.0, expected_clients=2.0, generator=fixed_key()
    )
    assert norms == pytest.approx([update_norm(u) for u in ups])
    assert update_norm(mean) <= 1.0


def test_strategy_support_is_each_strategys_own_declaration():
    from server.privacy import privatisable_names
    from strategies import create

    assert privatisable_names(create("ffa"), [A, B, HEAD]) == [B, HEAD]
    assert privatisable_names(create("fedit"), [A, B, HEAD]) == [A, B, HEAD]
    for name in ("flexlora", "flora", "hetlora", "fair"):
        with pytest.raises(ClientDPError, match=f"strategy '{name}'"):
            privatisable_names(create(name), [A, B])
    with pytest.raises(ClientDPError, match="SVD"):
        privatisable_names(create("flexlora"), [A, B])


def test_poisson_sampling_is_seeded_and_has_rate_q():
    ids = [f"c{i}" for i in range(200)]
    first = sample_clients(ids, 0.1, "poisson", np.random.default_rng(7))
    assert first == sample_clients(ids, 0.1, "poisson", np.random.default_rng(7))
    counts = [len(sample_clients(ids, 0.1, "poisson", np.random.default_rng(s))) for s in range(200)]
    assert np.mean(counts) == pytest.approx(20.0, rel=0.05)
    assert np.std(counts) > 0  # the count varies: Poisson, not fixed-size
    assert sample_clients(ids[:3], 0.01, "poisson", np.random.default_rng(0)) == []  # may be empty
    nodes = list(range(100))  # node ids and a checkpointable random.Random work too
    assert sample_clients(nodes, 0.2, "poisson", random.Random(1)) == sample_clients(
        nodes, 0.2, "poisson", random.Random(1)
    )
    assert len(sample_clients(nodes, 0.2, "fixed", random.Random(1))) == 20


def test_fixed_size_sampling_and_accounting():
    ids = [f"c{i}" for i in range(10)]
    picked = sample_clients(ids, 0.3, "fixed", np.random.default_rng(3))
    assert len(picked) == 3 and len(set(picked)) == 3
    assert expected_clients(10, 0.3, "fixed") == 3.0 and expected_clients(10, 0.3, "poisson") == 3.0
    assert accounted_sample_rate(0.3, "fixed") == 1.0 and accounted_sample_rate(0.3, "poisson") == 0.3
    with pytest.raises(ClientDPError, match="method='random'"):
        sample_clients(ids, 0.3, "random", np.random.default_rng(0))
    # The ledger of a client-level run records the sampling and accounts fixed-size with q = 1.
    ledger = PrivacyLedger("all-clients", "client", 1e-5, 1.0)
    poisson = ledger.record(1, 1.0, 0.3, 1, "poisson").record(2, 1.0, 0.3, 1, "poisson")
    fixed = ledger.record(1, 1.0, 0.3, 1, "fixed").record(2, 1.0, 0.3, 1, "fixed")
    assert fixed.history == [(1.0, 1.0, 1), (1.0, 1.0, 1)]
    assert fixed.epsilon() > poisson.epsilon()


def fixed_key(i: int = 7) -> SecureRandom:
    return SecureRandom(bytes([i]) * 32)  # reproducible noise, tests only
