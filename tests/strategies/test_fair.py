"""LoRA-FAIR: FedIT's averages plus the correction of B, by hand, against autograd and textbook Adam."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_W, PROPERTY, clones, hand_pair, lora_state, product, result, same

import strategies.fair as fair
from fedlora.adapters import LoraPair
from strategies.base import ClientSpec
from strategies.common import StrategyError
from strategies.fair import (
    LoraFAIR,
    correct_batch,
    factored_cosine,
    fair_module,
    fair_objective,
    weighted_gram_norm,
)
from strategies.fedit import FedIT

F64 = torch.float64
A, B = "m.lora_A.weight", "m.lora_B.weight"


def cos(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0))


def make(seed: int, k: int, r: int, d_out: int, d_in: int):
    gen = torch.Generator().manual_seed(seed)
    dims = {"m": (d_out, d_in)}
    results = [
        result(i, r, 2.0 * r, 1 + 5 * i, lora_state(gen, r, dims, dtype=torch.float64)) for i in range(k)
    ]
    return lora_state(gen, r, dims, dtype=torch.float64), results


def ideal(results) -> torch.Tensor:
    p = torch.tensor([x.num_examples for x in results], dtype=torch.float64)
    p = p / p.sum()
    return sum(pk * product(x.state, "m") for pk, x in zip(p, results, strict=True))


def test_hand_zero_steps_equals_fedit_values():
    s1, s2 = hand_pair()
    res = [result(0, 1, 2.0, 1, s1), result(1, 1, 2.0, 3, s2)]
    out = LoraFAIR(steps=0).aggregate(s1, res)
    assert torch.equal(out[A], torch.tensor([[2.5, 0.5]]))
    assert torch.equal(out[B], torch.tensor([[0.25], [0.75], [-1.0]]))
    assert torch.equal(out[HEAD_W], torch.tensor([[1.0, 5.0]]))


@pytest.mark.parametrize("params", [{"steps": 0}, {"lam": math.inf}, {"lam": 1e12, "steps": 10}])
def test_degenerate_settings_give_fedit_exactly(params):
    state, results = make(3, 3, 2, 5, 4)
    out = LoraFAIR(**params).aggregate(state, results)
    assert same(out, FedIT().aggregate(state, results))


def test_hand_full_rank_a_reaches_cosine_one():
    # r = d_in = 2 and A_bar = [[1.5, 0], [0, 1]] is invertible: the least-squares ceiling is 1.
    p1 = LoraPair(
        a=torch.tensor([[1.0, 0.0], [0.0, 1.0]]), b=torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    )
    p2 = LoraPair(
        a=torch.tensor([[2.0, 0.0], [0.0, 1.0]]), b=torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    )
    w = torch.tensor([0.5, 0.5], dtype=torch.float64)
    dw = 0.5 * (p1.b @ p1.a + p2.b @ p2.a).double()
    torch.testing.assert_close(dw, torch.tensor([[0.5, 1.0], [1.0, 0.0], [0.0, 0.5]], dtype=torch.float64))
    a0, b0 = fair_module([p1, p2], w, 0.0, 0, 1e-2)
    # FedIT: B_bar A_bar = [[.75, 1], [.75, 0], [0, .5]]; <dW, Y> = |Y|^2 = 2.375, |dW|^2 = 2.5
    assert abs(cos(dw, b0 @ a0) - math.sqrt(2.375 / 2.5)) < 1e-12
    a, b = fair_module([p1, p2], w, 1e-8, 300, 5e-2)
    assert torch.equal(a, a0)
    assert cos(dw, b @ a) > 0.9999


@PROPERTY
@given(st.integers(0, 2**31), st.integers(2, 5), st.integers(1, 3), st.integers(2, 7), st.integers(2, 7))
def test_property_cosine_between_fedit_and_least_squares_ceiling(seed, k, r, d_out, d_in):
    state, results = make(seed, k, r, d_out, d_in)
    before = clones([state, results])
    out = LoraFAIR(steps=30, lr=1e-2).aggregate(state, results)
    assert same(before, [state, results])
    base = FedIT().aggregate(state, results)
    dw = ideal(results)
    a_bar = base[A].double()
    ceiling = cos(dw, dw @ torch.linalg.pinv(a_bar) @ a_bar)
    c_fedit, c_fair = cos(dw, product(base, "m")), cos(dw, product(out, "m"))
    assert c_fedit - 1e-12 <= c_fair <= ceiling + 1e-9
    assert torch.equal(out[A], base[A]) and torch.equal(out[HEAD_W], base[HEAD_W])


def test_correction_improves_a_typical_case():
    state, results = make(11, 4, 2, 8, 6)
    out = LoraFAIR().aggregate(state, results)
    base = FedIT().aggregate(state, results)
    dw = ideal(results)
    assert cos(dw, product(out, "m")) > cos(dw, product(base, "m")) + 1e-3


def test_factored_cosine_matches_dense_and_handles_zero():
    gen = torch.Generator().manual_seed(0)
    b1, a1 = (
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(3, 4, generator=gen, dtype=torch.float64),
    )
    b2, a2 = (
        torch.randn(5, 2, generator=gen, dtype=torch.float64),
        torch.randn(2, 4, generator=gen, dtype=torch.float64),
    )
    assert abs(float(factored_cosine(b1, a1, b2, a2)) - cos(b1 @ a1, b2 @ a2)) < 1e-12
    assert float(factored_cosine(b1, a1, torch.zeros_like(b2), a2)) == 0.0


def test_zero_updates_give_fedit_without_nan():
    gen = torch.Generator().manual_seed(0)
    res = [result(i, 2, 4.0, 3, lora_state(gen, 2, {"m": (4, 3)}, zero_b=True)) for i in range(3)]
    out = LoraFAIR().aggregate(res[0].state, res)
    assert same(out, FedIT().aggregate(res[0].state, res))
    assert all(bool(torch.isfinite(v).all()) for v in out.values())


def test_cancelling_b_is_corrected_without_nan():
    # B_bar = 0 while delta_W != 0: the cosine starts at 0 and must not become NaN.
    s1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [1.0]])}
    s2 = {A: torch.tensor([[1.0, 1.0]]), B: torch.tensor([[-1.0], [-1.0]])}
    res = [result(0, 1, 2.0, 1, s1), result(1, 1, 2.0, 1, s2)]
    out = LoraFAIR(steps=50, lr=1e-2).aggregate(s1, res)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    dw = ideal(res)  # [[0, -.5], [0, -.5]]; A_bar = [[1, .5]], so the ceiling is .5 / |(1, .5)|
    assert abs(cos(dw, product(out, "m")) - 0.5 / math.sqrt(1.25)) < 1e-3


def test_mixed_ranks_refused():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(StrategyError, match="hetlora"):
        LoraFAIR().init_state(
            lora_state(gen, 2, {"m": (3, 2)}), [ClientSpec(0, 2, 4.0), ClientSpec(1, 1, 2.0)]
        )


def test_closed_form_gradient_matches_autograd():
    gen = torch.Generator().manual_seed(5)
    b_cat = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    a_cat = torch.randn(6, 5, generator=gen, dtype=torch.float64)
    a_bar = torch.randn(2, 5, generator=gen, dtype=torch.float64)
    b_bar = torch.randn(6, 2, generator=gen, dtype=torch.float64)
    d_b = 0.1 * torch.randn(6, 2, generator=gen, dtype=torch.float64)
    norm_w = float((b_cat @ a_cat).norm())
    loss, grad = fair_objective(d_b, b_bar, b_cat @ (a_cat @ a_bar.T), a_bar @ a_bar.T, norm_w, 0.3)
    x = d_b.clone().requires_grad_(True)
    ref = 1 - factored_cosine(b_cat, a_cat, b_bar + x, a_bar) + 0.3 * (x * x).sum()
    ref.backward()
    assert abs(loss - float(ref.detach())) < 1e-12
    torch.testing.assert_close(grad, x.grad)


def test_aggregation_restores_the_thread_count():
    before = torch.get_num_threads()
    state, results = make(1, 2, 1, 3, 3)
    LoraFAIR(steps=3).aggregate(state, results)
    assert torch.get_num_threads() == before


def test_fair_objective_by_hand_at_a_zero_product_and_a_small_q():
    # B = 0: q = 0, the cosine is 0 and its gradient is m / sqrt(_TINY) (den = 1e-150).
    m = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    zero = torch.zeros(1, 2, dtype=torch.float64)
    gram = torch.eye(2, dtype=torch.float64)
    loss, grad = fair_objective(zero, zero, m, gram, 2.0, 0.5)
    assert loss == 1.0
    torch.testing.assert_close(grad, -m * 1e150, rtol=1e-12, atol=0.0)
    # 0 < q <= 1: B = [[1]], gram_a = [[0.25]], m = [[2]], ||dW|| = 1, lambda = 0.
    # inner = 2, q = 0.25, den = 0.5, cos = 4, d cos / dB = (2 - (2 / 0.25) * 0.25) / 0.5 = 0.
    one = torch.tensor([[1.0]], dtype=torch.float64)
    loss, grad = fair_objective(torch.zeros(1, 1, dtype=torch.float64), one, 2.0 * one, 0.25 * one, 1.0, 0.0)
    assert loss == pytest.approx(1.0 - 4.0, abs=1e-12)
    assert float(grad) == pytest.approx(0.0, abs=1e-12)


def _textbook_fair(m, gram_a, norm_w, b_bar, lam, steps, lr):
    """Adam as torch.optim.Adam defines it, on fair_objective, keeping the best iterate (dB = 0 included)."""
    d_b = torch.zeros_like(b_bar)
    mom, var = torch.zeros_like(b_bar), torch.zeros_like(b_bar)
    best, best_loss = d_b.clone(), math.inf
    for t in range(1, steps + 2):
        loss, grad = fair_objective(d_b, b_bar, m, gram_a, norm_w, lam)
        if loss < best_loss:
            best, best_loss = d_b.clone(), loss
        if t > steps:
            break
        mom = 0.9 * mom + 0.1 * grad
        var = 0.999 * var + 0.001 * grad * grad
        d_b = d_b - lr * (mom / (1 - 0.9**t)) / ((var / (1 - 0.999**t)).sqrt() + 1e-8)
    return best


@pytest.mark.parametrize("lr", [1e-3, 5e-2])
def test_vectorised_adam_loop_equals_textbook_adam(lr):
    gen = torch.Generator().manual_seed(7)
    d_out, r, d_in, kr = 7, 2, 5, 6
    b_cat = torch.randn(3, d_out, kr, generator=gen, dtype=F64)
    a_cat = torch.randn(3, kr, d_in, generator=gen, dtype=F64)
    a_bar = torch.randn(3, r, d_in, generator=gen, dtype=F64)
    b_bar = torch.randn(3, d_out, r, generator=gen, dtype=F64)
    m = b_cat @ (a_cat @ a_bar.mT)
    gram_a = a_bar @ a_bar.mT
    norm_w = (b_cat @ a_cat).flatten(1).norm(dim=1)
    got = correct_batch(m, gram_a, norm_w, b_bar, 0.05, 30, lr)
    for i in range(3):
        want = _textbook_fair(m[i], gram_a[i], float(norm_w[i]), b_bar[i], 0.05, 30, lr)
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-12)


def test_vectorised_adam_at_a_zero_and_a_small_product_equals_textbook_adam():
    # Module 0 has B_bar = 0 (q = 0 at the first step: the gradient's coefficient must be 0 and den
    # stay real); module 1 a product far below 1 (q ~ 1e-6: no floor at 1 may enter q or the
    # coefficient). fair_objective is independent code for the same objective.
    gen = torch.Generator().manual_seed(12)
    a = 1e-2 * torch.randn(2, 3, 4, generator=gen, dtype=F64)
    gram_a = a @ a.mT
    m = 1e-2 * torch.randn(2, 5, 3, generator=gen, dtype=F64)
    b_bar = 1e-2 * torch.randn(2, 5, 3, generator=gen, dtype=F64)
    b_bar[0] = 0.0
    norm_w = torch.tensor([2e-3, 5e-3], dtype=F64)
    got = correct_batch(m, gram_a, norm_w, b_bar, 0.01, 20, 1e-3)
    assert bool(got[0].any()) and bool(got[1].any())
    for i in range(2):
        want = _textbook_fair(m[i], gram_a[i], float(norm_w[i]), b_bar[i], 0.01, 20, 1e-3)
        torch.testing.assert_close(got[i], want, rtol=1e-9, atol=1e-15)


def test_float32_adam_reaches_the_float64_objective():
    # Real adapters are float32: the same iteration in float32 ends where float64 does, to rounding.
    gen = torch.Generator().manual_seed(3)
    b_cat = 1e-2 * torch.randn(2, 64, 24, generator=gen, dtype=F64)
    a_cat = torch.randn(2, 24, 40, generator=gen, dtype=F64) / 8
    a_bar, b_bar = 0.3 * a_cat[:, :8], (0.1 * b_cat[:, :, :8]).contiguous()
    m, gram_a = b_cat @ (a_cat @ a_bar.mT), a_bar @ a_bar.mT
    norm_w = (b_cat @ a_cat).flatten(1).norm(dim=1)
    args = (0.01, 100, 1e-3)
    d64 = correct_batch(m, gram_a, norm_w, b_bar, *args)
    d32 = correct_batch(m.float(), gram_a.float(), norm_w.float(), b_bar.float(), *args)
    assert d32.dtype == torch.float32
    for i in range(2):

        def loss(d_b, i=i):
            return fair_objective(d_b.double(), b_bar[i], m[i], gram_a[i], float(norm_w[i]), 0.01)[0]

        assert loss(d64[i]) < loss(torch.zeros_like(d64[i]))  # the correction helps
        assert abs(loss(d32[i]) - loss(d64[i])) < 1e-5


def test_fair_module_of_one_client_returns_its_factors():
    # One client: FedIT's average is (A_1, B_1) and B_1 A_1 is the ideal update, so the cosine is
    # already 1, the objective's gradient at dB = 0 vanishes and no correction is made.
    a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    b = torch.tensor([[0.5, 0.0], [1.0, 2.0]])
    a_bar, b_new = fair_module([LoraPair(a, b)], torch.tensor([1.0], dtype=F64), 0.01, 20, 1e-2)
    assert a_bar.dtype == F64 and b_new.dtype == F64
    assert torch.equal(a_bar, a.double())
    torch.testing.assert_close(b_new, b.double(), rtol=0.0, atol=1e-9)


def test_factored_cosine_of_products_smaller_than_one():
    # B1 A1 = [[0.3, 0]], B2 A2 = [[0.4, 0.4]]: <.,.> = 0.12, norms 0.3 and 0.4 sqrt(2), so the
    # cosine is 1 / sqrt(2); the denominator's square 0.0288 is below 1 and must not be clamped up.
    b1, a1 = torch.tensor([[0.3]], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64)
    b2, a2 = torch.tensor([[0.4]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)
    assert math.isclose(float(factored_cosine(b1, a1, b2, a2)), 1 / math.sqrt(2), rel_tol=1e-12)


def test_weighted_gram_norm_by_hand():
    # B_cat = [[1, 1]], A_cat = I (m = 2), weights (0.5, 0.25): B diag(w) A = [[0.5, 0.25]], whose
    # norm sqrt(0.3125) is below 1 (a clamp at 1 or dividing by the weights would show).
    b_cat = torch.tensor([[[1.0, 1.0]]], dtype=F64)
    a_cat = torch.eye(2, dtype=F64)[None]
    norm = weighted_gram_norm(b_cat, a_cat, torch.tensor([0.5, 0.25], dtype=F64))
    assert norm.shape == (1,) and math.isclose(float(norm[0]), math.sqrt(0.3125), rel_tol=1e-15)


def two_module_results(zero_b_in: str | None = None):
    gen = torch.Generator().manual_seed(7)
    dims = {"m1": (5, 4), "m2": (5, 4)}
    states = [lora_state(gen, 2, dims, dtype=F64, head=None) for _ in range(3)]
    if zero_b_in is not None:
        for s in states:
            s[f"{zero_b_in}.lora_B.weight"] = torch.zeros(5, 2, dtype=F64)
    return states[0], [result(i, 2, 4.0, 1 + 2 * i, s) for i, s in enumerate(states)]


def test_one_adam_step_already_corrects_b():
    # steps = 1 is one Adam step from FedIT's B (then the last pass evaluates it), not "no steps".
    state, results = two_module_results()
    fedit, fair = FedIT().aggregate(state, results), LoraFAIR(steps=1).aggregate(state, results)
    for mod in ("m1", "m2"):
        assert torch.equal(fair[f"{mod}.lora_A.weight"], fedit[f"{mod}.lora_A.weight"])
        assert not torch.equal(fair[f"{mod}.lora_B.weight"], fedit[f"{mod}.lora_B.weight"])


def test_a_module_without_update_keeps_fedits_b_next_to_a_corrected_one():
    # Every client's B of m2 is zero: its ideal update is zero, so m2 keeps FedIT's B = 0 exactly,
    # while m1, in the same batch, is corrected.
    state, results = two_module_results(zero_b_in="m2")
    fedit, fair = FedIT().aggregate(state, results), LoraFAIR(steps=5).aggregate(state, results)
    assert torch.equal(fair["m2.lora_B.weight"], torch.zeros(5, 2, dtype=F64))
    assert not torch.equal(fair["m1.lora_B.weight"], fedit["m1.lora_B.weight"])


def test_fair_in_chunks_of_one_module_equals_one_chunk(monkeypatch):
    # A cache budget of one byte makes every module its own chunk: each is corrected once, in order.
    gen = torch.Generator().manual_seed(8)
    dims = {f"m{i}": (6, 3) for i in range(3)}
    states = [lora_state(gen, 2, dims, dtype=F64, head=None) for _ in range(2)]
    results = [result(i, 2, 4.0, 1 + i, s) for i, s in enumerate(states)]
    whole = LoraFAIR(steps=3).aggregate(states[0], results)
    monkeypatch.setattr(fair, "ADAM_CACHE_BYTES", 1)
    chunked = LoraFAIR(steps=3).aggregate(states[0], results)
    assert whole.keys() == chunked.keys()
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0.0, atol=1e-15)


def test_defaults_are_the_documented_ones():
    # docs/strategies.md: `lam=0.01`, `steps=100`, `lr=1e-3`
    s = LoraFAIR()
    assert (s.lam, s.steps, s.lr) == (0.01, 100, 1e-3)
