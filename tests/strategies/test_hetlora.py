"""HetLoRA: zero-padding to the global rank, norm weights per module, each client's scale folded into B."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_W, PROPERTY, clones, lora_state, product, result, same

from fedlora.adapters import LoraPair
from strategies.base import ClientSpec
from strategies.common import StrategyError, pad_rank
from strategies.hetlora import HetLoRA, norm_weights, product_norm
from strategies.ranked import client_view

A, B = "m.lora_A.weight", "m.lora_B.weight"


def started(specs, rank=2, seed=0, dims=None):
    s = HetLoRA()
    gen = torch.Generator().manual_seed(seed)
    template = lora_state(gen, rank, dims or {"m": (3, 2)}, zero_b=True, head=None)
    state = s.init_state({**template, HEAD_W: torch.zeros(1, 2)}, specs)
    return s, state


def test_hand_computed_norm_weighted_padding():
    # client 0: r=1, s=2, 2 B A = [[2, 0], [0, 0], [0, 0]] -> norm 2
    # client 1: r=2, s=2, 2 B A = [[0, 0], [0, 4], [0, 0]] -> norm 4  => w = (1/3, 2/3)
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 2, 4.0)]
    s, state = started(specs)
    s1 = {
        A: torch.tensor([[1.0, 0.0]]),
        B: torch.tensor([[1.0], [0.0], [0.0]]),
        HEAD_W: torch.tensor([[4.0, 8.0]]),
    }
    s2 = {
        A: torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        B: torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 0.0]]),
        HEAD_W: torch.tensor([[0.0, 4.0]]),
    }
    out = s.aggregate(state, [result(0, 1, 2.0, 1, s1), result(1, 2, 4.0, 3, s2)])
    torch.testing.assert_close(out[A], torch.tensor([[1 / 3, 2 / 3], [2 / 3, 0.0]]))
    torch.testing.assert_close(out[B], torch.tensor([[1 / 3, 0.0], [4 / 3, 0.0], [0.0, 0.0]]))
    assert torch.equal(out[HEAD_W], torch.tensor([[1.0, 5.0]]))  # the head uses example weights
    assert list(out) == list(state)


def test_zero_updates_fall_back_to_example_weights():
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 2, 4.0)]
    s, state = started(specs)
    s1 = {A: torch.tensor([[4.0, 0.0]]), B: torch.zeros(3, 1), HEAD_W: torch.zeros(1, 2)}
    s2 = {A: torch.tensor([[0.0, 4.0], [0.0, 0.0]]), B: torch.zeros(3, 2), HEAD_W: torch.zeros(1, 2)}
    out = s.aggregate(state, [result(0, 1, 2.0, 1, s1), result(1, 2, 4.0, 3, s2)])
    assert torch.equal(out[A], torch.tensor([[1.0, 3.0], [0.0, 0.0]]))
    assert not out[B].any()


def test_payload_slices_and_folds_scale():
    specs = [ClientSpec(0, 3, 6.0), ClientSpec(1, 1, 1.0)]  # s_g = 2, client 1 has s = 1
    s, state = started(specs, rank=3)
    state = {**state, B: torch.arange(9.0).reshape(3, 3)}
    p = s.payload(state, specs[1])
    assert p.adapter[A].shape == (1, 2) and p.adapter[B].shape == (3, 1)
    torch.testing.assert_close(p.adapter[B], 2.0 * state[B][:, :1])
    torch.testing.assert_close(
        product(p.adapter, "m", 1.0), product({**state, A: state[A][:1], B: state[B][:, :1]}, "m", 2.0)
    )
    with pytest.raises(StrategyError, match="above the global rank 3"):
        s.payload(state, ClientSpec(2, 4, 8.0))


def test_init_checks_template_rank_and_requires_init():
    with pytest.raises(StrategyError, match="build the template at rank 4"):
        started([ClientSpec(0, 4, 8.0)], rank=2)
    with pytest.raises(StrategyError, match="init_state"):
        HetLoRA().global_scale  # noqa: B018
    s, _ = started([ClientSpec(0, 2, 4.0), ClientSpec(1, 1, 1.0)])
    assert s.state_dict() == {"global_rank": 2, "global_scale": 2.0}
    t = HetLoRA()
    t.load_state_dict(s.state_dict())
    assert (t.global_rank, t.global_scale) == (2, 2.0)


@PROPERTY
@given(
    st.integers(0, 2**31),
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.integers(1, 5),
    st.integers(1, 5),
)
def test_property_padding_and_views_preserve_each_clients_product(seed, ranks, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    alphas = [float(torch.randint(1, 9, (1,), generator=gen)) for _ in ranks]
    specs = [ClientSpec(i, r, a) for i, (r, a) in enumerate(zip(ranks, alphas, strict=True))]
    s, _ = started(specs, rank=max(ranks), seed=seed, dims={"m": (d_out, d_in)})
    sg = s.global_scale
    for spec in specs:
        st_k = lora_state(gen, spec.rank, {"m": (d_out, d_in)}, dtype=torch.float64, head=None)
        # padding with the scale folded leaves the client's own product unchanged
        a_pad, b_pad = pad_rank(st_k[A], st_k[B] * (spec.scale / sg), max(ranks))
        torch.testing.assert_close(sg * b_pad @ a_pad, product(st_k, "m", spec.scale))
        # the global state's view for the client carries the same product the global state does
        g = {A: a_pad, B: b_pad}
        view = client_view(g, spec.rank, sg / spec.scale)
        torch.testing.assert_close(product(view, "m", spec.scale), product(st_k, "m", spec.scale))


@PROPERTY
@given(st.integers(0, 2**31), st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_property_aggregate_is_norm_weighted_padded_mean(seed, ranks):
    gen = torch.Generator().manual_seed(seed)
    specs = [ClientSpec(i, r, 2.0 * r) for i, r in enumerate(ranks)]
    s, state = started(specs, rank=max(ranks), seed=seed, dims={"m": (4, 3)})
    results = [
        result(
            i, r, 2.0 * r, 1 + i, {**lora_state(gen, r, {"m": (4, 3)}, head=None), HEAD_W: torch.ones(1, 2)}
        )
        for i, r in enumerate(ranks)
    ]
    before = clones([state, results])
    out = s.aggregate(state, results)
    assert same(before, [state, results])
    pairs = [LoraPair(x.state[A], x.state[B]) for x in results]
    w = norm_weights(pairs, [x.spec.scale for x in results], torch.tensor([1.0] * len(ranks)))
    assert abs(float(w.sum()) - 1.0) < 1e-12
    norms = torch.tensor([2.0 * product_norm(p.a, p.b) for p in pairs], dtype=torch.float64)
    torch.testing.assert_close(w, norms / norms.sum())
    exp_a = sum(
        wk * pad_rank(p.a.double(), p.b.double(), max(ranks))[0] for wk, p in zip(w, pairs, strict=True)
    )
    torch.testing.assert_close(out[A].double(), exp_a, rtol=1e-5, atol=1e-6)


def test_product_norm_matches_dense():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=gen), torch.randn(4, 3, generator=gen)
    assert abs(product_norm(a, b) - float(torch.linalg.matrix_norm((b @ a).double()))) < 1e-5


def test_mixed_alpha_folds_each_clients_scale_into_b():
    # client 0: r=1, alpha=1 (s=1); client 1: r=2, alpha=8 (s=4) fixes R=2, s_g=4.
    # s_0 B_0 A_0 = [[2, 0], [0, 0], [0, 0]] -> norm 2; s_1 B_1 A_1 = [[0, 0], [0, 4], [0, 0]] -> norm 4
    # => w = (1/3, 2/3). Folded: B_0 * (s_0 / s_g) = [[0.5], [0], [0]], B_1 * (4 / 4) = B_1.
    # A_g = [[1/3, 2/3], [2/3, 0]], B_g = 1/3 [[0.5, 0], 0, 0] + 2/3 [[0, 0], [1, 0], 0].
    specs = [ClientSpec(0, 1, 1.0), ClientSpec(1, 2, 8.0)]
    s, state = started(specs)
    assert s.global_scale == 4.0
    s1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[2.0], [0.0], [0.0]]), HEAD_W: torch.zeros(1, 2)}
    s2 = {
        A: torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        B: torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
        HEAD_W: torch.zeros(1, 2),
    }
    out = s.aggregate(state, [result(0, 1, 1.0, 1, s1), result(1, 2, 8.0, 1, s2)])
    torch.testing.assert_close(out[A], torch.tensor([[1 / 3, 2 / 3], [2 / 3, 0.0]]))
    torch.testing.assert_close(out[B], torch.tensor([[1 / 6, 0.0], [2 / 3, 0.0], [0.0, 0.0]]))
    # Client 0's next payload folds s_g / s_0 = 4 back into its rank-1 slice of B_g.
    view = s.payload(out, specs[0]).adapter
    torch.testing.assert_close(view[B], torch.tensor([[2 / 3], [8 / 3], [0.0]]))


def test_small_updates_are_norm_weighted_not_example_weighted():
    # The hand-computed case scaled by 1/100: norms 0.02 and 0.04 (sum < 1) still give w = (1/3, 2/3),
    # not the example weights (1/4, 3/4); only an all-zero round falls back.
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 2, 4.0)]
    s, state = started(specs)
    s1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[0.01], [0.0], [0.0]]), HEAD_W: torch.zeros(1, 2)}
    s2 = {
        A: torch.tensor([[0.0, 1.0], [1.0, 0.0]]),
        B: torch.tensor([[0.0, 0.0], [0.02, 0.0], [0.0, 0.0]]),
        HEAD_W: torch.zeros(1, 2),
    }
    out = s.aggregate(state, [result(0, 1, 2.0, 1, s1), result(1, 2, 4.0, 3, s2)])
    torch.testing.assert_close(out[A], torch.tensor([[1 / 3, 2 / 3], [2 / 3, 0.0]]))
    pairs = [LoraPair(x[A], x[B]) for x in (s1, s2)]
    w = norm_weights(pairs, [2.0, 2.0], torch.tensor([0.25, 0.75], dtype=torch.float64))
    torch.testing.assert_close(w, torch.tensor([1 / 3, 2 / 3], dtype=torch.float64))


A1, B1, A2, B2 = "m1.lora_A.weight", "m1.lora_B.weight", "m2.lora_A.weight", "m2.lora_B.weight"


def zero_template() -> dict[str, torch.Tensor]:
    return {A1: torch.zeros(1, 2), B1: torch.zeros(2, 1), A2: torch.zeros(1, 2), B2: torch.zeros(2, 1)}


def test_same_shape_modules_are_weighted_each_by_their_own_norms():
    # Both clients at rank 1, scale 2. Module m1: client norms 2 and 6 -> w = (1/4, 3/4).
    # Module m2: client 0 moved nothing (B = 0), client 1 norm 2 -> w = (0, 1).
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 1, 2.0)]
    s = HetLoRA()
    state = s.init_state(zero_template(), specs)
    c0 = {A1: torch.tensor([[1.0, 0.0]]), B1: torch.tensor([[1.0], [0.0]]),
          A2: torch.tensor([[8.0, 0.0]]), B2: torch.zeros(2, 1)}  # fmt: skip
    c1 = {A1: torch.tensor([[0.0, 1.0]]), B1: torch.tensor([[0.0], [3.0]]),
          A2: torch.tensor([[0.0, 1.0]]), B2: torch.tensor([[1.0], [0.0]])}  # fmt: skip
    out = s.aggregate(state, [result(0, 1, 2.0, 1, c0), result(1, 1, 2.0, 1, c1)])
    torch.testing.assert_close(out[A1], torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(out[B1], torch.tensor([[0.25], [2.25]]))
    torch.testing.assert_close(out[A2], torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out[B2], torch.tensor([[1.0], [0.0]]))


def test_an_all_zero_module_falls_back_to_example_weights_alone():
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 1, 2.0)]
    s = HetLoRA()
    state = s.init_state(zero_template(), specs)
    c0 = {A1: torch.tensor([[4.0, 0.0]]), B1: torch.zeros(2, 1), A2: torch.tensor([[1.0, 0.0]]),
          B2: torch.tensor([[1.0], [0.0]])}  # fmt: skip
    c1 = {A1: torch.tensor([[0.0, 4.0]]), B1: torch.zeros(2, 1), A2: torch.tensor([[0.0, 1.0]]),
          B2: torch.tensor([[0.0], [1.0]])}  # fmt: skip
    out = s.aggregate(state, [result(0, 1, 2.0, 1, c0), result(1, 1, 2.0, 3, c1)])
    torch.testing.assert_close(out[A1], torch.tensor([[1.0, 3.0]]))  # example weights (1/4, 3/4)
    torch.testing.assert_close(out[A2], torch.tensor([[0.5, 0.5]]))  # equal norms: (1/2, 1/2)


def test_norm_weights_by_hand_with_negative_scales_and_fallbacks():
    one = LoraPair(torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    two = LoraPair(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    fallback = torch.tensor([0.5, 0.5], dtype=torch.float32)
    w = norm_weights([one, two], [-1.0, 1.0], fallback)
    assert w.dtype == torch.float64 and w.tolist() == [0.75, 0.25]
    zero = LoraPair(torch.zeros(1, 1), torch.zeros(1, 1))
    fb = norm_weights([zero, zero], [1.0, 1.0], fallback)
    assert fb.dtype == torch.float64 and fb.tolist() == [0.5, 0.5]
    assert norm_weights([one, two], [math.inf, 1.0], fallback).tolist() == [0.5, 0.5]
    tiny = LoraPair(torch.tensor([[1e-3]]), torch.tensor([[1e-3]]))
    assert norm_weights([tiny, two], [1.0, 1.0], fallback).tolist()[0] < 1e-5


F32, F64 = torch.float32, torch.float64


def test_product_norm_is_exact_where_float32_gram_entries_cancel():
    # B A = [[0, 2]] (norm 2) from A's rows (1e4, 1), (1e4, -1) and B = [[1, -1]]:
    # A A^T = [[1e8 + 1, 1e8 - 1], [1e8 - 1, 1e8 + 1]], B^T B = [[1, -1], [-1, 1]],
    # tr(B^T B A A^T) = 2 (1e8 + 1) - 2 (1e8 - 1) = 4. In float32 every entry of A A^T rounds to
    # 1e8 (spacing 8), so a float32 Gram matrix gives 0: the float64 cast is what makes it 2.
    a = torch.tensor([[1e4, 1.0], [1e4, -1.0]], dtype=F32)
    b = torch.tensor([[1.0, -1.0]], dtype=F32)
    assert torch.equal(b.double() @ a.double(), torch.tensor([[0.0, 2.0]], dtype=F64))
    assert product_norm(a, b) == 2.0
    # The same with the cancellation in B^T B: B = [[1e4, 1e4], [1, -1]], A = [[1], [-1]]: B A = [[0], [2]].
    assert product_norm(torch.tensor([[1.0], [-1.0]]), torch.tensor([[1e4, 1e4], [1.0, -1.0]])) == 2.0


def test_norm_weights_refuses_scales_that_do_not_match_the_clients():
    # Three scales for two clients: truncating would silently drop a client's scale.
    one = LoraPair(torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    two = LoraPair(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    fallback = torch.tensor([0.5, 0.5])
    with pytest.raises(ValueError, match="zip"):
        norm_weights([one, two], [1.0, 1.0, 1.0], fallback)
    with pytest.raises(ValueError, match="zip"):
        norm_weights([one, two], [1.0], fallback)
