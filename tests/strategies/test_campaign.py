"""The campaign bound (strategies/campaign.py): hand-computed cases, the wrapper, and a campaign played out.

The attacker test plays a poisoned node that adds the same small push to an otherwise honest
update every round, inside the per-round norm bound: against FedIT with today's per-round
defences its pull on the global state grows linearly with the rounds; with the campaign bound
it stays within ``factor`` times an honest node's random walk.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.adapters import a_name, b_name
from fedlora.config import ConfigError, RobustConfig, RunConfig, with_overrides
from server.loop import FederationError, build_strategy
from strategies.base import ClientResult, ClientSpec
from strategies.campaign import (
    HISTORY_KEY,
    CampaignBound,
    campaign_fractions,
    keep_fraction,
    update_residuals,
)
from strategies.fedit import FedIT
from strategies.robust import RobustCenter, bound_updates

A, B = a_name("m"), b_name("m")


def vec(*xs: float) -> dict[str, torch.Tensor]:
    return {"x": torch.tensor(xs, dtype=torch.float64)}


# -- keep_fraction: ||H + t e|| <= cap, largest t in [0, 1] -------------------------------------


def test_no_history_scales_the_residual_to_the_cap():
    assert keep_fraction(None, vec(3.0, 4.0), 10.0) == 1.0
    assert keep_fraction(None, vec(3.0, 4.0), 2.5) == pytest.approx(0.5)


def test_history_counts_toward_the_cap():
    assert keep_fraction(vec(3.0, 0.0), vec(0.0, 4.0), 5.0) == 1.0  # exactly on the cap
    # 9 + 16 t^2 <= 13  ->  t = 1/2
    assert keep_fraction(vec(3.0, 0.0), vec(0.0, 4.0), math.sqrt(13.0)) == pytest.approx(0.5)


def test_a_node_over_its_budget_keeps_only_what_takes_it_back():
    # |4 - 8 t| <= 3 for t in [1/8, 7/8]: the largest is 7/8
    assert keep_fraction(vec(4.0), vec(-8.0), 3.0) == pytest.approx(7 / 8)
    # |6 - 2 t| <= 3 needs t >= 1.5: none in [0, 1]; moving back all the way (t = 1) is closest
    assert keep_fraction(vec(6.0), vec(-2.0), 3.0) == 1.0
    # pointing further away: nothing is kept
    assert keep_fraction(vec(6.0), vec(2.0), 3.0) == 0.0
    # sideways from outside: closest point of H + t e to the origin is t = 0
    assert keep_fraction(vec(6.0, 0.0), vec(0.0, 1.0), 3.0) == 0.0


def test_residuals_are_taken_from_the_median_of_the_other_nodes():
    centres, res = update_residuals([vec(1.0, 5.0), vec(2.0, -1.0), vec(10.0, 0.0)])
    # leave-one-out medians of two values are their means
    assert [c["x"].tolist() for c in centres] == [[6.0, -0.5], [5.5, 2.5], [1.5, 2.0]]
    assert [r["x"].tolist() for r in res] == [[-5.0, 5.5], [-3.5, -3.5], [8.5, -2.0]]


def test_fractions_cap_at_factor_times_the_lower_median_node():
    res = [vec(-1.0), vec(0.0), vec(8.0)]  # norms 1, 0, 8: lower median 1
    assert campaign_fractions([None, None, None], res, 2.0) == pytest.approx([1.0, 1.0, 0.25])
    hist = [vec(0.0), vec(1.0), vec(3.0)]  # ||H + e|| = 1, 1, 11 -> cap 2; |3 + 8 t| <= 2 has no t >= 0
    assert campaign_fractions(hist, res, 2.0) == pytest.approx([1.0, 1.0, 0.0])


def test_fewer_than_three_nodes_or_a_zero_reference_bound_nothing():
    assert campaign_fractions([None, None], [vec(0.0), vec(100.0)], 1.0) == [1.0, 1.0]
    assert campaign_fractions([None] * 3, [vec(0.0), vec(0.0), vec(5.0)], 1.0) == [1.0, 1.0, 1.0]


# -- the wrapper around FedIT ---------------------------------------------------------------------


def fedit_state(b: float = 0.0) -> dict[str, torch.Tensor]:
    return {A: torch.ones(1, 2), B: torch.full((2, 1), b)}


def res(node: int, b: float) -> ClientResult:
    return ClientResult(ClientSpec(node, 1, 1.0), 10, fedit_state(b))


def four() -> list[ClientResult]:
    """B entries -1, 0, 1, 8; leave-one-out medians 1, 1, 0, 0; residuals -2, -1, 1, 8 per entry."""
    return [res(1, -1.0), res(2, 0.0), res(3, 1.0), res(4, 8.0)]


def test_wrapper_moves_the_outlier_to_its_reference_plus_its_kept_share():
    wrapped = CampaignBound(FedIT(), factor=2.0)
    state = fedit_state(0.0)
    results = four()
    new = wrapped.aggregate(state, results)
    # residual norms / sqrt 2: 2, 1, 1, 8 -> lower median 1, cap 2: node 1 exactly on it, node 4
    # keeps 1/4: B = 0 + 0.25 * 8 = 2; the mean of (-1, 0, 1, 2) is 1/2
    assert wrapped.last_fractions == pytest.approx({1: 1.0, 2: 1.0, 3: 1.0, 4: 0.25})
    assert torch.allclose(new[B], torch.full((2, 1), 0.5))
    assert torch.equal(new[A], state[A])  # no node moved A
    assert torch.equal(results[3].state[B], torch.full((2, 1), 8.0))  # inputs not mutated
    assert wrapped.history[4][B].flatten().tolist() == pytest.approx([2.0, 2.0])
    assert wrapped.history[1][B].flatten().tolist() == pytest.approx([-2.0, -2.0])


def test_history_survives_state_dict_and_a_second_round():
    wrapped = CampaignBound(FedIT(), factor=2.0)
    wrapped.aggregate(fedit_state(), four())
    again = CampaignBound(FedIT(), factor=2.0)
    again.load_state_dict(wrapped.state_dict())
    assert set(again.history) == {1, 2, 3, 4}
    # Round 2, the same updates: |H + e| per entry 4, 2, 2, 10 -> lower median 2, cap 4;
    # node 4 had 2 and may reach 4: |2 + 8 t| <= 4 -> t = 1/4
    again.aggregate(fedit_state(), four())
    assert again.last_fractions == pytest.approx({1: 1.0, 2: 1.0, 3: 1.0, 4: 0.25})
    assert again.history[4][B].flatten().tolist() == pytest.approx([4.0, 4.0])
    # a state without histories (a run that turns the bound on when resumed) starts them empty
    fresh = CampaignBound(FedIT(), factor=2.0)
    fresh.load_state_dict({})
    assert fresh.history == {} and HISTORY_KEY in fresh.state_dict()


def test_fewer_than_three_nodes_pass_through():
    wrapped = CampaignBound(FedIT(), factor=1.0)
    results = [res(1, 0.0), res(2, 100.0)]
    assert torch.allclose(wrapped.aggregate(fedit_state(), results)[B], torch.full((2, 1), 50.0))
    assert wrapped.history == {}


def test_wrapper_refuses_product_methods_and_factors_below_one():
    from strategies.flexlora import FlexLoRA

    with pytest.raises(ValueError, match="campaign bound applies to"):
        CampaignBound(FlexLoRA(), 2.0)
    with pytest.raises(ValueError, match=">= 1"):
        CampaignBound(FedIT(), 0.5)


def test_config_and_server_wiring():
    with pytest.raises(ConfigError, match=r"robust\.campaign_bound"):
        RobustConfig(campaign_bound=0.5)
    cfg = with_overrides(RunConfig(), {"robust.campaign_bound": 2.0, "robust.aggregator": "median"})
    strategy = build_strategy(cfg)
    assert isinstance(strategy, CampaignBound) and isinstance(strategy.inner, RobustCenter)
    assert not isinstance(build_strategy(RunConfig()), CampaignBound)  # off by default
    client_dp = with_overrides(
        RunConfig(), {"robust.campaign_bound": 2.0, "privacy.mode": "client", "privacy.noise_multiplier": 1.0}
    )
    with pytest.raises(FederationError, match="client-level DP"):
        build_strategy(client_dp)


# -- a campaign played out ----------------------------------------------------------------------


def play_campaign(rounds: int, campaign: float) -> float:
    """Return the global state's move along the attacker's direction after ``rounds`` FedIT rounds.

    Five nodes of which node 4 is poisoned; every round each honest node sends a seeded
    Gaussian update of B (A unchanged, scale 1) and the attacker the same plus a push of
    half the typical honest norm along a fixed direction. The per-round norm bound of
    :func:`strategies.robust.bound_updates` (3x the median) applies first, as in the server.
    """
    gen = torch.Generator().manual_seed(7)
    d = 16
    push = torch.zeros(d, 1)
    push[0] = 0.5 * math.sqrt(d)  # half an honest update's typical norm (sqrt(d))
    inner = FedIT()
    strategy = CampaignBound(inner, campaign) if campaign else inner
    state = {A: torch.ones(1, 4), B: torch.zeros(d, 1)}
    for _ in range(rounds):
        results = []
        for node in range(5):
            step = torch.randn(d, 1, generator=gen)
            if node == 4:
                step = step + push
            results.append(ClientResult(ClientSpec(node, 1, 1.0), 10, {A: state[A], B: state[B] + step}))
        sent = {r.spec.node_id: state for r in results}
        kept = bound_updates(results, sent, bound=3.0, max_norm=1e4, max_abs=1e4).results
        state = strategy.aggregate(state, kept)
    return float(state[B][0, 0])


def test_a_campaign_adds_up_without_the_bound_and_as_a_random_walk_with_it():
    # FedIT's mean gives the push weight 1/5 every round: 0.4 per round
    undefended = {r: play_campaign(r, 0.0) for r in (60, 240)}
    defended = {r: play_campaign(r, 1.5) for r in (60, 240)}
    assert undefended[240] > 0.8 * 240 * 0.4 and undefended[240] / undefended[60] > 3.3  # linear
    assert defended[240] / defended[60] < 2.6  # sqrt(4) = 2 for a random walk, 4 for a campaign
    assert defended[240] < undefended[240] / 2.5


def test_histories_survive_the_checkpoint_file(tmp_path):
    from fedlora.checkpoint import load_checkpoint, save_checkpoint

    wrapped = CampaignBound(FedIT(), factor=2.0)
    wrapped.aggregate(fedit_state(), four())
    save_checkpoint(tmp_path / "c.pt", {"strategy": wrapped.state_dict()})
    again = CampaignBound(FedIT(), factor=2.0)
    again.load_state_dict(load_checkpoint(tmp_path / "c.pt")["strategy"])  # weights_only load
    assert again.history.keys() == wrapped.history.keys()
    assert all(torch.equal(again.history[n][B], wrapped.history[n][B]) for n in wrapped.history)
