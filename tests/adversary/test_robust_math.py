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
    rs = [_result(n, {}, n=c) for n, c in enumerate([10, 20, 30, 40, 10**9])]
    assert [r.num_examples for r in cap_example_counts(rs, 3.0)] == [10, 20, 30, 40, 90]
    assert [r.num_examples for r in cap_example_counts(rs, 0)] == [10, 20, 30, 40, 10**9]
    # four updates: a small round, capped at 1 x the median whatever the configured factor
    assert [r.num_examples for r in cap_example_counts(rs[1:], 3.0)] == [20, 30, 30, 30]


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


# Value-by-value checks of every branch (they make mutation testing kill robust.py mutants).


def test_update_norm_squares_the_scale_and_adds_the_head_by_hand():
    sent = {A: torch.zeros(1, 2), B: torch.zeros(2, 1), H: torch.zeros(2)}
    got = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[2.0], [0.0]]), H: torch.tensor([3.0, 4.0])}
    # ΔBA = [[2, 0], [0, 0]]: ||3 ΔBA||^2 = 36; head: 9 + 16 = 25
    assert update_norm(sent, got, 3.0) == pytest.approx(math.sqrt(36.0 + 25.0), rel=1e-12)
    # halfway: B_t A_t = [[0.5, 0], [0, 0]] -> 9 * 0.25; head (1.5, 2) -> 6.25
    assert update_norm(sent, got, 3.0, t=0.5) == pytest.approx(math.sqrt(2.25 + 6.25), rel=1e-12)
    assert update_norm(sent, {**got, H: torch.tensor([1e200, 0.0], dtype=torch.float64)}, 1.0) == math.inf


def test_update_norm_of_b_only_modules_scales_with_the_client():
    sent, got = {B: torch.zeros(2, 1)}, {B: torch.tensor([[3.0], [4.0]])}
    assert update_norm(sent, got, 2.0) == pytest.approx(10.0)
    assert update_norm(sent, got, 2.0, t=0.5) == pytest.approx(5.0)


def test_shrink_moves_each_tensor_toward_what_was_sent_and_keeps_dtypes():
    sent = {A: torch.zeros(2), H: torch.tensor([2.0, 2.0])}
    got = {A: torch.tensor([4.0, -4.0], dtype=torch.float16), H: torch.tensor([6.0, 0.0])}
    out = shrink(sent, got, 0.25)
    assert out[A].tolist() == [1.0, -1.0] and out[A].dtype == torch.float16
    assert out[H].tolist() == [3.0, 1.5]


def test_clip_factor_bisects_to_the_bound_from_below():
    sent, got = {B: torch.zeros(1, 1)}, {B: torch.tensor([[8.0]])}
    t = clip_factor(sent, got, 1.0, 2.0)  # norm(t) = 8 t: t = 1/4
    assert t == pytest.approx(0.25, abs=1e-11) and t <= 0.25
    assert clip_factor(sent, got, 1.0, 8.0) == 1.0  # exactly at the bound: untouched
    assert clip_factor(sent, got, 1.0, 0.0) == 0.0


def test_lower_median_of_an_even_count_is_the_smaller_middle():
    assert lower_median([4.0, 1.0, 3.0, 2.0]) == 2.0
    assert lower_median([5.0]) == 5.0


def _b_result(node: int, value: float, n: int = 10) -> ClientResult:
    return ClientResult(spec=ClientSpec(node, 1, 1.0), num_examples=n, state={B: torch.tensor([[value]])})


def test_bound_updates_reports_each_decision_exactly():
    sent = {n: {B: torch.zeros(1, 1)} for n in range(1, 7)}
    rs = [_b_result(1, 1.0), _b_result(2, 2.0), _b_result(3, 3.0), _b_result(4, 100.0), _b_result(5, 50.0)]
    rs.append(ClientResult(spec=ClientSpec(6, 1, 1.0), num_examples=1, state={B: torch.tensor([[5000.0]])}))
    out = bound_updates(rs, sent, bound=2.0, max_norm=60.0, max_abs=1000.0)
    assert out.rejected == [
        {"node": 4, "reason": "update norm 100 exceeds the cap 60"},
        {"node": 6, "reason": "a value of magnitude 5e+03 exceeds 1000"},
    ]
    assert out.norms == {1: 1.0, 2: 2.0, 3: 3.0, 5: 50.0}
    # lower median of (1, 2, 3, 50) = 2, limit 4: only node 5 is clipped, to norm 4
    assert len(out.clipped) == 1
    c = out.clipped[0]
    assert (c["node"], c["norm"], c["bound"]) == (5, 50.0, 4.0) and c["factor"] == pytest.approx(0.08)
    assert [r.spec.node_id for r in out.results] == [1, 2, 3, 5]
    assert float(out.results[3].state[B]) == pytest.approx(4.0)
    assert out.results[0] is rs[0] and out.results[2] is rs[2]


def test_bound_updates_caps_are_inclusive_and_nan_norms_are_rejected():
    sent = {n: {B: torch.zeros(1, 1)} for n in (1, 2, 3)}
    huge = ClientResult(
        spec=ClientSpec(3, 1, 1.0), num_examples=1, state={B: torch.tensor([[1e300]], dtype=torch.float64)}
    )
    rs = [_b_result(1, 10.0), _b_result(2, -10.0), huge]
    sent[3] = {
        B: torch.tensor([[-1e300]], dtype=torch.float64)
    }  # 1e300 - (-1e300) overflows: the norm is inf
    out = bound_updates(rs, sent, bound=0.0, max_norm=10.0, max_abs=1e301)
    assert [r.spec.node_id for r in out.results] == [1, 2] and out.clipped == []
    assert out.rejected == [{"node": 3, "reason": "update norm inf exceeds the cap 10"}]
    empty = ClientResult(spec=ClientSpec(1, 1, 1.0), num_examples=1, state={B: torch.zeros(1, 0)})
    one = bound_updates([empty], {1: {B: torch.zeros(1, 0)}}, bound=2.0, max_norm=1.0, max_abs=0.0)
    assert one.results == [empty] and one.rejected == []


def test_bound_updates_needs_two_results_and_a_positive_bound_to_clip():
    sent = {n: {B: torch.zeros(1, 1)} for n in (1, 2)}
    rs = [_b_result(1, 1.0), _b_result(2, 100.0)]
    assert bound_updates(rs[:1], sent, bound=2.0, max_norm=1e9, max_abs=1e9).clipped == []
    assert bound_updates(rs, sent, bound=0.0, max_norm=1e9, max_abs=1e9).clipped == []
    assert bound_updates(rs, sent, bound=-1.0, max_norm=1e9, max_abs=1e9).clipped == []
    clipped = bound_updates(rs, sent, bound=2.0, max_norm=1e9, max_abs=1e9).clipped
    assert [c["node"] for c in clipped] == [2] and clipped[0]["bound"] == 1.5  # small round: 1.5 x median


def test_example_count_cap_floors_at_one_and_needs_two_results():
    rs = [_result(n, {}, n=c) for n, c in enumerate([10, 20, 30])]
    assert [r.num_examples for r in cap_example_counts(rs, 0.01)] == [1, 1, 1]
    assert [r.num_examples for r in cap_example_counts(rs, 1.5)] == [10, 20, 20]  # small round: 1.0
    assert [r.num_examples for r in cap_example_counts(rs, 1.0)] == [10, 20, 20]
    assert [r.num_examples for r in cap_example_counts(rs[2:], 0.01)] == [30]
    assert [r.num_examples for r in cap_example_counts(rs, -1.0)] == [10, 20, 30]


def test_median_of_an_even_count_and_trimmed_mean_caps_the_trim():
    four = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([3.0]), torch.tensor([10.0])]
    med = coordinate_median(four)
    assert med.tolist() == [2.5] and med.dtype == torch.float64
    assert trimmed_mean(four, 0.5).tolist() == [2.5]  # 2 of 4 each side would leave none: trim 1
    assert trimmed_mean(four, 0.0).tolist() == [2.5]  # K >= 3 trims at least one each side
    assert trimmed_mean(four[:3], 0.34).tolist() == [2.0]
    skewed = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([10.0])]
    assert trimmed_mean(skewed, 0.9).tolist() == [2.0]  # floor(2.7) = 2 each side leaves none: trim 1
    nine = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 3.0, 4.0, 10.0, 20.0, 30.0, 40.0)]
    assert trimmed_mean(nine, 0.34).tolist() == [(3.0 + 4.0 + 10.0) / 3]  # floor(3.06) = 3 each side
    assert trimmed_mean(four[:2], 0.5).tolist() == [1.5]


def test_robust_center_trimmed_mean_keeps_unsent_tensors_and_dtypes():
    state = {A: torch.ones(1, 2), B: torch.zeros(1, 1, dtype=torch.float16), H: torch.full((1,), 7.0)}
    rs = [_result(n, {B: torch.tensor([[v]])}) for n, v in enumerate([1.0, 2.0, 6.0, 100.0, -50.0])]
    center = RobustCenter(create("ffa"), "trimmed-mean", fraction=0.2)
    out = center.aggregate(state, rs)
    assert out[B].tolist() == [[3.0]] and out[B].dtype == torch.float16  # mean of 1, 2, 6 (median: 2)
    assert torch.equal(out[A], state[A]) and out[A] is not state[A] and torch.equal(out[H], state[H])
    assert float(state[B]) == 0.0  # input not mutated
    wide = RobustCenter(create("ffa"), "trimmed-mean", fraction=0.4).aggregate(state, rs)
    assert wide[B].tolist() == [[2.0]]
    assert RobustCenter(create("fedit"), "trimmed-mean").fraction == 0.2


def test_robust_center_refuses_the_plain_mean_and_names_the_choices():
    with pytest.raises(
        ValueError, match=r"robust centre must be one of \('median', 'trimmed-mean'\), got 'mean'"
    ):
        RobustCenter(create("fedit"), "mean")
    with pytest.raises(
        ValueError, match=r"^robust centre 'median' applies to fedit, ffa, not 'hetlora'; use norm"
    ):
        RobustCenter(create("hetlora"), "median")


def test_aggregate_checked_rolls_back_when_no_subset_is_finite():
    fedit = create("fedit")
    template = {A: torch.zeros(2, 5), B: torch.zeros(3, 2), H: torch.zeros(2)}
    state = fedit.init_state(template, [ClientSpec(n, 2, 4.0) for n in (1, 2)])
    nan = {A: torch.full((2, 5), math.nan), B: torch.zeros(3, 2), H: torch.zeros(2)}
    new, offenders = aggregate_checked(fedit, state, [_result(1, nan), _result(2, nan)])
    assert new is state and offenders == [1, 2]
    ok, none = aggregate_checked(fedit, state, [_result(1, _state(1)), _result(2, _state(2))])
    assert none == [] and torch.allclose(ok[B], (_state(1)[B] + _state(2)[B]) / 2)
    ints = {**_state(1), "step": torch.tensor([1])}
    assert aggregate_checked(fedit, state, [_result(1, ints)])[1] == []


def test_robust_center_of_one_result_is_that_result():
    state = {B: torch.zeros(1, 1)}
    out = RobustCenter(create("fedit"), "median").aggregate(state, [_result(1, {B: torch.tensor([[4.0]])})])
    assert out[B].tolist() == [[4.0]]


def test_robust_center_refuses_an_unnamed_inner_object_with_its_repr():
    inner = object()
    with pytest.raises(ValueError) as err:
        RobustCenter(inner, "median")  # type: ignore[arg-type]
    assert str(err.value) == (
        f"robust centre 'median' applies to fedit, ffa, not {inner!r}; "
        "use norm bounding for the other methods"
    )


def test_update_norm_sums_every_module_and_measures_b_when_the_result_lacks_a():
    na, nb = "n.lora_A.weight", "n.lora_B.weight"
    two = {A: torch.zeros(1, 1), B: torch.zeros(1, 1), na: torch.zeros(1, 1), nb: torch.zeros(1, 1)}
    got = {A: torch.ones(1, 1), B: torch.tensor([[3.0]]), na: torch.ones(1, 1), nb: torch.tensor([[4.0]])}
    assert update_norm(two, got, 1.0) == pytest.approx(5.0)  # sqrt(3^2 + 4^2): both modules count
    sent = {A: torch.ones(1, 2), B: torch.zeros(2, 1)}
    assert update_norm(sent, {B: torch.tensor([[3.0], [4.0]])}, 2.0) == pytest.approx(10.0)
    zero_change = {A: torch.ones(1, 1), B: torch.ones(1, 1)}
    assert update_norm(zero_change, dict(zero_change), math.inf) == math.inf  # inf * 0 is reported as inf


def test_bound_updates_goes_on_after_a_rejection_and_keeps_norms_on_every_path():
    sent = {n: {B: torch.zeros(1, 1)} for n in (1, 2, 3)}
    peak = ClientResult(spec=ClientSpec(1, 1, 1.0), num_examples=1, state={B: torch.tensor([[50.0]])})
    rs = [peak, _b_result(2, 1.0), _b_result(3, 2.0)]
    one_left = bound_updates(rs[:2], sent, bound=2.0, max_norm=1e9, max_abs=10.0)
    assert one_left.norms == {2: 1.0} and [r.spec.node_id for r in one_left.results] == [2]
    assert one_left.rejected == [{"node": 1, "reason": "a value of magnitude 50 exceeds 10"}]
    off = bound_updates(rs, sent, bound=0.0, max_norm=1e9, max_abs=10.0)
    assert off.norms == {2: 1.0, 3: 2.0} and len(off.rejected) == 1 and off.clipped == []
    zero = bound_updates([_b_result(2, 0.0), _b_result(3, 0.0)], sent, bound=2.0, max_norm=1e9, max_abs=10.0)
    assert zero.norms == {2: 0.0, 3: 0.0} and zero.rejected == [] and zero.clipped == []


def test_bound_one_clips_to_the_median_and_a_norm_at_the_limit_is_kept():
    sent = {n: {B: torch.zeros(1, 1)} for n in (1, 2, 3)}
    at_limit = bound_updates(
        [_b_result(1, 1.0), _b_result(2, 2.0), _b_result(3, 2.0)], sent, bound=1.0, max_norm=1e9, max_abs=1e9
    )
    assert at_limit.clipped == []  # lower median 2, limit 2: norms equal to it are not clipped
    out = bound_updates(
        [_b_result(1, 1.0), _b_result(2, 2.0), _b_result(3, 3.0)], sent, bound=1.0, max_norm=1e9, max_abs=1e9
    )
    assert [c["node"] for c in out.clipped] == [3] and out.clipped[0]["bound"] == 2.0


def test_example_counts_of_two_results_are_capped():
    rs = [_result(n, {}, n=c) for n, c in enumerate([10, 1000])]
    assert [r.num_examples for r in cap_example_counts(rs, 3.0)] == [10, 10]  # small round: 1 x median


def test_aggregate_checked_restores_strategy_state_when_rolling_back():
    flora = create("flora")
    template = {A: torch.zeros(2, 5), B: torch.zeros(3, 2), H: torch.zeros(2)}
    state = flora.init_state(template, [ClientSpec(n, 2, 4.0) for n in (1, 2)])
    before = flora.state_dict()
    nan = {A: torch.full((2, 5), math.nan), B: torch.zeros(3, 2), H: torch.zeros(2)}
    new, offenders = aggregate_checked(flora, state, [_result(1, nan), _result(2, nan)])
    assert new is state and offenders == [1, 2]
    after = flora.state_dict()
    assert after["rounds"] == before["rounds"] and after.keys() == before.keys()


def test_a_single_kept_result_is_never_clipped_even_below_bound_one():
    sent = {1: {B: torch.zeros(1, 1)}}
    out = bound_updates([_b_result(1, 4.0)], sent, bound=0.5, max_norm=1e9, max_abs=1e9)
    assert out.clipped == [] and float(out.results[0].state[B]) == 4.0
