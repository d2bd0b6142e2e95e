"""Client-level DP-FedAvg as the server applies it: through ``ServerPrivacy.wrap`` and ``aggregate``.

The expected release is computed here independently of ``fedlora.privacy.client_dp``: each
update's L2 norm over every privatised value in float64 with numpy, clipping by
``min(1, C / norm)``, a plain sum, and division by the FIXED expected client count
``m = num_clients * q`` (never by the number of updates that arrived), with equal weight per
client whatever its example count.
"""

import math

import numpy as np
import pytest
import torch

from fedlora.config import RunConfig, with_overrides
from server.privacy import ServerPrivacy
from strategies import create
from strategies.base import ClientResult, ClientSpec

A, B = "m.lora_A.weight", "m.lora_B.weight"
HEAD = "classifier.weight"
CLIP = 0.5
SPECS = [ClientSpec(i, 2, 4.0) for i in range(3)]


def wrapped(tmp_path, strategy, sigma, sampling="fixed", rate=1.0, num_clients=4):
    over = {
        "privacy.mode": "client",
        "privacy.noise_multiplier": sigma,
        "privacy.clip_norm": CLIP,
        "privacy.client_sampling": sampling,
        "federation.strategy": strategy,
        "federation.num_clients": num_clients,
    }
    if sampling == "poisson":
        over["privacy.client_sample_rate"] = rate
    cfg = with_overrides(RunConfig(), over)
    privacy = ServerPrivacy(cfg, tmp_path)
    return privacy.wrap(create(strategy)), privacy


def global_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        A: torch.randn(2, 3, generator=g),
        B: torch.randn(3, 2, generator=g),
        HEAD: torch.randn(4, 3, generator=g),
    }


def deltas(names):
    # client 0: large (clipped); client 1: small (kept); client 2: exactly zero
    g = torch.Generator().manual_seed(1)
    big = {k: 3.0 * torch.randn(*global_state()[k].shape, generator=g) for k in names}
    small = {k: 0.01 * torch.randn(*global_state()[k].shape, generator=g) for k in names}
    zero = {k: torch.zeros_like(global_state()[k]) for k in names}
    return [big, small, zero]


def independent_norm(update):
    return math.sqrt(sum(float(np.sum(np.square(v.numpy().astype(np.float64)))) for v in update.values()))


def expected_release(state, updates, m):
    out = {k: v.double().clone() for k, v in state.items()}
    for u in updates:
        n = independent_norm(u)
        factor = min(1.0, CLIP / n) if n > 0 else 1.0
        for k, v in u.items():
            out[k] += factor * v.double() / m
    return out


def results_for(state, payload_names, updates, counts=(1, 500, 7)):
    return [
        ClientResult(
            spec=spec,
            num_examples=n,
            state={k: state[k] + u[k] if k in u else state[k].clone() for k in payload_names},
        )
        for spec, u, n in zip(SPECS, updates, counts, strict=True)
    ]


@pytest.mark.parametrize(("sampling", "rate", "m"), [("fixed", 1.0, 4.0), ("poisson", 0.5, 2.0)])
def test_fedit_release_is_clipped_sum_over_fixed_denominator(tmp_path, sampling, rate, m):
    strategy, privacy = wrapped(tmp_path, "fedit", 1e-12, sampling, rate)
    state = strategy.init_state(global_state(), SPECS)
    ups = deltas([A, B, HEAD])
    assert independent_norm(ups[0]) > 10 * CLIP and independent_norm(ups[1]) < CLIP
    out = strategy.aggregate(state, results_for(state, list(state), ups))
    exp = expected_release(state, ups, m)  # 3 updates arrived, but the denominator is m
    for k in state:
        torch.testing.assert_close(out[k].double(), exp[k], atol=1e-6, rtol=1e-6)
    # Equal weights: example counts (1, 500, 7) do not matter; swapping them changes nothing.
    again, _ = wrapped(tmp_path / "again", "fedit", 1e-12, sampling, rate)
    again.init_state(global_state(), SPECS)
    out2 = again.aggregate(state, results_for(state, list(state), ups, counts=(500, 1, 1)))
    for k in state:
        torch.testing.assert_close(out2[k], out[k], atol=1e-6, rtol=1e-6)
    # One step per round is accounted, with the sampling rate actually used.
    hist = privacy.ledgers["all-clients"].history
    assert len(hist) == 1 and hist[0][1:] == ((rate if sampling == "poisson" else 1.0), 1)


def test_clipped_contribution_is_bounded_by_c_over_m(tmp_path):
    # Sensitivity as the server applies it: one client's effect on the release is at most C / m.
    strategy, _ = wrapped(tmp_path, "fedit", 1e-12)
    state = strategy.init_state(global_state(), SPECS)
    ups = deltas([A, B, HEAD])
    with_all = strategy.aggregate(state, results_for(state, list(state), ups))
    strategy2, _ = wrapped(tmp_path / "b", "fedit", 1e-12)
    strategy2.init_state(global_state(), SPECS)
    without_big = strategy2.aggregate(state, results_for(state, list(state), [ups[2], ups[1], ups[2]]))
    diff = {k: with_all[k] - without_big[k] for k in state}
    assert independent_norm(diff) == pytest.approx(CLIP / 4.0, rel=1e-5)


def test_ffa_leaves_frozen_a_out_of_clipping_and_noise(tmp_path):
    strategy, _ = wrapped(tmp_path, "ffa", 1e-12)
    state = strategy.init_state(global_state(), SPECS)
    payload = strategy.payload(state, SPECS[0]).adapter
    assert A not in payload
    ups = deltas([B, HEAD])
    out = strategy.aggregate(state, results_for(state, list(payload), ups))
    assert torch.equal(out[A], state[A])
    exp = expected_release(state, ups, 4.0)  # the norm covers B and the head only
    for k in (B, HEAD):
        torch.testing.assert_close(out[k].double(), exp[k], atol=1e-6, rtol=1e-6)


def test_noise_std_is_sigma_c_over_m_on_the_release(tmp_path):
    sigma, m = 2.0, 4.0
    strategy, _ = wrapped(tmp_path, "ffa", sigma)
    big = {A: torch.randn(8, 256), B: torch.zeros(256, 8), HEAD: torch.zeros(4, 256)}
    specs = [ClientSpec(i, 8, 16.0) for i in range(2)]
    state = strategy.init_state(big, specs)
    names = list(strategy.payload(state, specs[0]).adapter)
    zero = [ClientResult(spec=s, num_examples=1, state={k: state[k].clone() for k in names}) for s in specs]
    out = strategy.aggregate(state, zero)
    noise = torch.cat([(out[k] - state[k]).flatten() for k in names]).double()  # 3,072 draws
    assert torch.equal(out[A], state[A])
    assert float(noise.std()) == pytest.approx(sigma * CLIP / m, rel=0.05)
    assert abs(float(noise.mean())) < 4 * sigma * CLIP / m / math.sqrt(noise.numel())
