"""The robustness math on small tensors with hand-checkable answers (no model, no Flower)."""

from __future__ import annotations

import math

import pytest
import torch

from strategies.base import ClientResult, ClientSpec
from strategies.registry import create
from strategies.robust import (
    RobustCenter,
    aggregate_checked,
    bound_updates,
    cap_example_counts,
    clip_factor,
    coordinate_median,
    lower_median,
    shrink,
    trimmed_mean,
    update_norm,
)

A, B, H = "m.lora_A.weight", "m.lora_B.weight", "head.weight"


def _state(seed: int, r: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(r, 5, generator=g), torch.randn(3, r, generator=g)
    return {A: a, B: b, H: torch.randn(2, generator=g)}


def _result(node: int, state, n: int = 10, rank: int = 2) -> ClientResult:
    return ClientResult(spec=ClientSpec(node, rank, 2.0 * rank), num_examples=n, state=state)


def test_update_norm_equals_the_dense_computation():
    sent, got = _state(0), _state(1)
    d = {k: v.double() for k, v in got.items()}
    s = {k: v.double() for k, v in sent.items()}
    dense = 2.0 * (d[B] @ d[A] - s[B] @ s[A])
    expected = math.sqrt(float((dense**2).sum() + ((d[H] - s[H]) ** 2).sum()))
    assert update_norm(sent, got, 2.0) == pytest.approx(expected, rel=1e-9)
    half = shrink(sent, got, 0.5)
    dense_half = 2.0 * (half[B] @ half[A] - sent[B] @ sent[A])
    expected_half = math.sqrt(float((dense_half**2).sum() + ((half[H] - sent[H]) ** 2).sum()))
    assert update_norm(sent, got, 2.0, t=0.5) == pytest.approx(expected_half, rel=1e-5)


def test_update_norm_without_a_measures_b():  # FFA-LoRA: A frozen, not sent
    sent, got = {B: torch.zeros(3, 2)}, {B: torch.full((3, 2), 2.0)}
    assert update_norm(sent, got, 1.0) == pytest.approx(math.sqrt(6 * 4.0))


def test_clip_factor_meets_the_bound():
    sent, got = _state(0), _state(1)
    bound = update_norm(sent, got, 2.0) / 10
    t = clip_factor(sent, got, 2.0, bound)
    assert 0 < t < 1 and update_norm(sent, got, 2.0, t) == pytest.approx(bound, rel=1e-6)
    assert clip_factor(sent, got, 2.0, 1e9) == 1.0


def test_lower_median_ignores_one_liar_of_two():
    assert lower_median([1.0, 1e30]) == 1.0
    assert lower_median([3.0, 1.0, 2.0]) == 2.0


def test_bound_updates_clips_rejects_and_keeps():
    sent = _state(0)
    honest = [_result(n, shrink(sent, _state(n), 0.01)) for n in (1, 2, 3)]
    loud = _result(4, shrink(sent, _state(4), 1.0))
    absurd = _result(5, {**sent, B: torch.full_like(sent[B], 1e9)})
    out = bound_updates(
        [*honest, loud, absurd], {n: sent for n in range(1, 6)}, bound=3.0, max_norm=1e6, max_abs=1e4
    )
    assert [r["node"] for r in out.rejected] == [5] and [c["node"] for c in out.clipped] == [4]
    limit = out.clipped[0]["bound"]
    kept = {r.spec.node_id: r for r in out.results}
    assert update_norm(sent, kept[4].state, 2.0) <= limit * (1 + 1e-6)
    assert kept[1] is honest[0]  # untouched results are passed through


def test_example_counts_capped_at_a_multiple_of_the_median():
    rs = [_result(n, {}, n=c) for n, c in enumerate([10, 20, 30, 10**9])]
    assert [r.num_examples for r in cap_example_counts(rs, 3.0)] == [10, 20, 30, 60]
    assert [r.num_examples for r in cap_example_counts(rs, 0)] == [10, 20, 30, 10**9]


def test_coordinate_median_and_trimmed_mean():
    ts = [torch.tensor([1.0, -5.0]), torch.tensor([2.0, 0.0]), torch.tensor([100.0, 1.0])]
    assert coordinate_median(ts).tolist() == [2.0, 0.0]
    four = [*ts, torch.tensor([3.0, 2.0])]
    assert trimmed_mean(four, 0.25).tolist() == [2.5, 0.5]  # drops one at each end


def test_robust_center_for_fedit_and_refused_for_product_methods():
    fedit = RobustCenter(create("fedit"), "median")
    state = _state(0)
    rs = [_result(n, _state(n)) for n in (1, 2, 3)]
    out = fedit.aggregate(state, rs)
    assert torch.equal(out[B], coordinate_median([r.state[B] for r in rs]).float())
    with pytest.raises(ValueError, match="norm bounding"):
        RobustCenter(create("flexlora"), "median")


def test_aggregate_checked_finds_the_offender_and_restores_strategy_state():
    flora = create("flora")
    template = {A: torch.zeros(2, 5), B: torch.zeros(3, 2), H: torch.zeros(2)}
    specs = [ClientSpec(n, 2, 4.0) for n in (1, 2, 3)]
    state = flora.init_state(template, specs)
    good = [_result(n, _state(n)) for n in (1, 2)]
    bad = _result(3, {A: torch.full((2, 5), 1e25), B: torch.full((3, 2), 1e25), H: torch.zeros(2)})
    new, offenders = aggregate_checked(flora, state, [*good, bad])
    assert offenders == [3]
    clean = create("flora")
    expected = clean.final_merge(clean.aggregate(clean.init_state(template, specs), good))
    merge = flora.final_merge(new)  # exactly one aggregation of the good clients, not three
    assert merge is not None and expected is not None
    assert all(torch.allclose(merge[k], expected[k]) for k in expected)


def test_empty_updates_cannot_zero_the_round():
    sent = _state(0)
    zero = [_result(n, dict(sent)) for n in (1, 2)]
    real = _result(3, shrink(sent, _state(3), 0.1))
    out = bound_updates([*zero, real], {n: sent for n in (1, 2, 3)}, bound=3.0, max_norm=1e6, max_abs=1e4)
    assert out.clipped == [] and out.results[-1] is real
