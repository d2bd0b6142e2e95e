"""ε under replace-one neighbours: what holds when a reply discloses the data size.

Under add/remove a disclosed example count tells the two neighbours apart outright (no finite
ε), so the record-level report states ε for replacing one example, from the RDP of the
substitution pair (1-q) N(0, σ²) + q N(±1, σ²).
"""

import math

import numpy as np
import pytest

from fedlora.privacy.accounting import (
    RDP_ORDERS,
    compute_epsilon,
    rdp_per_step,
    rdp_replace_one_per_step,
    replace_one_epsilon,
)


def test_without_subsampling_it_is_the_gaussian_at_twice_the_sensitivity():
    # q = 1: N(+C) against N(-C), distance 2C: RDP α (2C)² / (2 σ² C²) = 2α / σ².
    for sigma in (0.7, 1.3, 4.0):
        expected = 2 * np.array(RDP_ORDERS) / sigma**2
        assert np.allclose(rdp_replace_one_per_step(sigma, 1.0), expected, rtol=1e-6)
        # ... which is add/remove at half the noise multiplier (sensitivity 2C).
        assert np.allclose(rdp_replace_one_per_step(sigma, 1.0), rdp_per_step(sigma / 2, 1.0), rtol=1e-6)


@pytest.mark.parametrize(("sigma", "q", "steps"), [(1.0, 0.2, 50), (1.5, 0.04, 2250), (0.946, 0.1, 15)])
def test_replace_one_costs_more_than_add_remove_and_at_most_group_privacy(sigma, q, steps):
    add_remove = compute_epsilon([(sigma, q, steps)], 1e-5, "rdp")
    held = replace_one_epsilon([(sigma, q, steps)], 1e-5)
    assert held > add_remove
    # Replacing is removing then adding: RDP at most that of add/remove at sensitivity 2C for every order.
    assert np.all(rdp_replace_one_per_step(sigma, q) <= rdp_per_step(sigma / 2, q) * (1 + 1e-6))


def test_no_noise_is_infinite_and_nothing_is_zero():
    assert replace_one_epsilon([(0.0, 0.1, 3)], 1e-5) == math.inf
    assert replace_one_epsilon([], 1e-5) == 0.0
