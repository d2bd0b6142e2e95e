"""The DP generator and the discrete Gaussian: every key bit counts, samples are exact, no float leak.

The attacks: torch's CPU generator keeps 32 bits of its seed, so a party that brute-forces 2^32
seeds regenerates a client's DP-SGD noise (or the server's client-level noise) and subtracts it;
and a floating-point Gaussian added to a float leaks the value's low bits.
"""

import math

import numpy as np
import pytest
import torch
from privacy_models import tiny_peft_bert, token_loader

from fedlora.privacy import randomness
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.privacy.noise import (
    DiscreteGaussianMechanism,
    discrete_gaussian,
    discrete_laplace,
    grid_step,
    poisson_mask,
)
from fedlora.privacy.randomness import SecureRandom


def key_of(value: int) -> bytes:
    return value.to_bytes(32, "little")


def first_noise(key: bytes, n: int = 16) -> np.ndarray:
    return discrete_gaussian(SecureRandom(key), n, 2.0**20)


def test_torch_cpu_generator_keeps_only_32_bits_of_its_seed():
    # Why fedlora does not use it for DP: seeds that differ only above bit 32 give one stream.
    s = 0x1234_5678
    a = torch.randn(8, generator=torch.Generator().manual_seed(s))
    b = torch.randn(8, generator=torch.Generator().manual_seed(s ^ (0xABCD << 32)))
    assert torch.equal(a, b)


@pytest.mark.parametrize("bit", [32, 33, 63, 64, 127, 128, 200, 255])
def test_keys_that_differ_only_above_bit_32_give_different_noise(bit):
    base = 0x1234_5678
    assert not np.array_equal(first_noise(key_of(base)), first_noise(key_of(base ^ (1 << bit))))


def test_every_key_bit_reaches_the_stream():
    base = SecureRandom(key_of(1)).words(4)
    for bit in range(256):
        assert not np.array_equal(SecureRandom(key_of(1 ^ (1 << bit))).words(4), base), bit


def test_brute_force_over_the_32_bit_keyspace_does_not_recover_the_noise():
    # The attacker of the old design: knows everything a 32-bit seed carried (here: the low 32 bits
    # of the real key) and scans 2^16 candidates for the next 16 bits. With a 256-bit key the
    # remaining 208 unknown bits stand between every candidate and the real stream.
    real_key = bytearray(np.random.default_rng(0).bytes(32))
    observed = first_noise(bytes(real_key))
    low32 = bytes(real_key[:4])
    hits = 0
    for guess in range(1 << 16):
        candidate = low32 + guess.to_bytes(2, "little") + bytes(26)
        hits += np.array_equal(SecureRandom(candidate).words(1), SecureRandom(bytes(real_key)).words(1))
    assert hits == 0
    assert not np.array_equal(first_noise(low32 + bytes(28)), observed)


def test_fresh_generators_draw_256_bits_of_os_entropy(monkeypatch):
    asked = []
    real = randomness.os.urandom
    monkeypatch.setattr(randomness.os, "urandom", lambda n: asked.append(n) or real(n))
    a, b = SecureRandom(), SecureRandom()
    assert asked == [32, 32]
    assert not np.array_equal(a.words(4), b.words(4))
    assert not hasattr(a, "key") and all(not isinstance(v, bytes) for v in vars(a).values())


def test_dp_sgd_noise_does_not_come_from_torch_generators():
    # Identical torch seeds everywhere: the DP noise still differs between two runs, and the
    # secure stream (not torch) is what the optimiser's noise consumed.
    def noise_once() -> torch.Tensor:
        torch.manual_seed(0)
        model = tiny_peft_bert(4)
        params = [p for p in model.parameters() if p.requires_grad]
        before = torch.cat([p.detach().flatten().clone() for p in params])
        opt = torch.optim.SGD(params, lr=1.0)
        private = make_private_lora(
            model, opt, token_loader(4, 4), noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False
        )
        net, dp_opt, loader = private
        torch.manual_seed(0)
        for ids, mask, _labels in loader:
            (net(input_ids=ids, attention_mask=mask).logits.sum() * 0.0).backward()
            dp_opt.step()
        assert private.mechanism.generator.bytes_drawn > 0
        return torch.cat([p.detach().flatten() for p in params]) - before

    assert not torch.equal(noise_once(), noise_once())


def test_discrete_gaussian_matches_its_pmf_at_sigma_one():
    # P(Z = k) = exp(-k²/2) / Σ_j exp(-j²/2); Σ_j exp(-j²/2) = √(2π)(1 + 2e^{-2π²} + ...)
    # = 2.506628288043 (Poisson summation).
    z = discrete_gaussian(SecureRandom(key_of(11)), 200_000, 1.0)
    norm = sum(math.exp(-(j**2) / 2) for j in range(-40, 41))
    assert norm == pytest.approx(2.506628288043, abs=1e-11)
    for k, p in [(0, 0.398942278267), (1, 0.241970723224), (2, 0.053990966224), (3, 0.004431848388)]:
        assert math.exp(-(k**2) / 2) / norm == pytest.approx(p, abs=1e-9)
        for signed in (k, -k):
            freq = float(np.mean(z == signed))
            assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(z)), (signed, freq, p)
    assert z.dtype == np.int64 and int(np.abs(z).max()) < 10


@pytest.mark.parametrize("sigma", [3.5, 2.0**20, 2.0**40])
def test_discrete_gaussian_has_variance_sigma_squared(sigma):
    z = discrete_gaussian(SecureRandom(key_of(12)), 100_000, sigma).astype(np.float64)
    assert z.std() == pytest.approx(sigma, rel=0.015)
    assert abs(z.mean()) < 5 * sigma / math.sqrt(len(z))


def test_discrete_laplace_matches_its_pmf():
    # P(Y = y) = (1 - e^{-1/t}) / (1 + e^{-1/t}) · e^{-|y|/t}; t = 2: P(0) = tanh(1/4) = 0.244918662
    y = discrete_laplace(SecureRandom(key_of(13)), 200_000, 2)
    assert float(np.mean(y == 0)) == pytest.approx(0.244918662, abs=0.005)
    assert float(np.mean(y == 3)) == pytest.approx(0.244918662 * math.exp(-1.5), abs=0.004)
    assert float(np.mean(y == -3)) == pytest.approx(0.244918662 * math.exp(-1.5), abs=0.004)


def test_bernoulli_and_poisson_masks_are_exact_thresholds():
    gen = SecureRandom(key_of(14))
    assert gen.bernoulli(0.0, 1000).sum() == 0 and gen.bernoulli(1.0, 1000).all()
    mask = poisson_mask(gen, 400_000, 0.03)
    assert mask.mean() == pytest.approx(0.03, abs=5 * math.sqrt(0.03 * 0.97 / 400_000))
    u = gen.integers_below(300_000, 3)
    assert set(np.unique(u)) == {0, 1, 2} and np.bincount(u).min() > 99_000


def test_release_is_on_the_grid_whatever_the_low_bits_of_the_value():
    # Floating-point attack: x + N(0, s²) in floats reveals x's low bits. The discrete mechanism
    # releases γ·(round(x/γ) + Z): every output is a multiple of γ, whatever x's low bits were.
    mech = DiscreteGaussianMechanism(1.0, 1.0, 1000, SecureRandom(key_of(15)))
    x = torch.randn(1000, dtype=torch.float64) * 0.01
    for value in (x, x + mech.gamma / 3, x + mech.gamma * 0.49):
        out = mech.noisy(value) / mech.gamma
        assert torch.equal(out, torch.round(out))


def test_grid_adds_at_most_one_millionth_of_c_to_the_sensitivity():
    for clip, dim in [(1.0, 1), (0.5, 74_000), (3.0, 4_000_000)]:
        gamma = grid_step(clip, dim)
        assert math.log2(gamma) == int(math.log2(gamma))  # a power of two: x / γ and γ·k are exact
        assert gamma * math.sqrt(dim) <= clip * 2.0**-20 < 2 * gamma * math.sqrt(dim)
        mech = DiscreteGaussianMechanism(1.7, clip, dim)
        assert mech.noise_std == pytest.approx(1.7 * clip * (1 + gamma * math.sqrt(dim) / clip), rel=1e-12)
        assert mech.sigma_units >= 2.0**20


def test_noise_off_and_bad_values():
    mech = DiscreteGaussianMechanism(0.0, 1.0, 3)
    x = torch.tensor([0.1, 0.2, 0.3])
    assert torch.equal(mech.noisy(x), x)
    noisy = DiscreteGaussianMechanism(1.0, 1.0, 3)
    with pytest.raises(ValueError, match="NaN"):
        noisy.noisy(torch.tensor([float("nan"), 0.0, 0.0]))
    with pytest.raises(ValueError, match="too large"):
        noisy.noisy(torch.tensor([1e30, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="32-byte key"):
        SecureRandom(b"short")
