"""FLoRA: stacking, the cumulative merge and its compaction, by hand and as properties."""

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_W, PROPERTY, clones, hand_pair, lora_state, product, result, same

from fedlora.adapters import LoraPair, fingerprint
from strategies.base import ClientSpec
from strategies.flora import FINGERPRINT_KEY, FLoRA, compact, extend_merge, flora_module

A, B = "m.lora_A.weight", "m.lora_B.weight"


def started(specs, rank, dims, seed=0):
    s = FLoRA()
    gen = torch.Generator().manual_seed(seed)
    template = lora_state(gen, rank, dims, zero_b=True, head=None)
    return s, s.init_state({**template, HEAD_W: torch.zeros(1, 2)}, specs)


def hand():
    # client 0: r=1, s=1; client 1: r=1, s=2; p = (1/4, 3/4)
    s1, s2 = hand_pair()
    return [result(0, 1, 1.0, 1, s1), result(1, 1, 2.0, 3, s2)]


def test_hand_stacking_and_payload():
    specs = [r.spec for r in hand()]
    s, state = started(specs, 1, {"m": (3, 2)})
    first = s.payload(state, specs[0])
    assert first.merge is None and first.extras[FINGERPRINT_KEY] == fingerprint({})
    out = s.aggregate(state, hand())
    merge = s.final_merge(out)
    # A_stack = [p1 s1 A1; p2 s2 A2] = [[.25, .5], [4.5, 0]]; B_stack = [B1 B2]
    assert torch.equal(merge[A], torch.tensor([[0.25, 0.5], [4.5, 0.0]]))
    assert torch.equal(merge[B], torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -2.0]]))
    assert torch.equal(out[A], state[A]) and torch.equal(out[B], state[B])  # fresh template kept
    assert torch.equal(out[HEAD_W], torch.tensor([[1.0, 5.0]]))
    p = s.payload(out, specs[1])
    assert p.train_a and same(p.merge, merge)
    assert p.extras[FINGERPRINT_KEY] == fingerprint(merge)
    assert same(p.adapter, {A: state[A], B: state[B], HEAD_W: out[HEAD_W]})
    assert not s.final_adapter(out, specs[0])[B].any()  # zero B: the adapter is a no-op


def test_merge_accumulates_over_rounds_and_round_trips_through_torch_save():
    specs = [r.spec for r in hand()]
    s, state = started(specs, 1, {"m": (3, 2)})
    state = s.aggregate(state, hand())
    second = [
        result(x.spec.node_id, 1, x.spec.alpha, x.num_examples, {k: 2 * v for k, v in x.state.items()})
        for x in hand()
    ]
    state = s.aggregate(state, second)
    merge = s.final_merge(state)
    # cumulative rank 4 exceeds min(d_out, d_in) = 2, so the merge was re-factored at rank 2
    assert merge[A].shape == (2, 2) and merge[B].shape == (3, 2)
    one = product(
        {A: torch.tensor([[0.25, 0.5], [4.5, 0.0]]), B: torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, -2.0]])},
        "m",
    )
    torch.testing.assert_close(product(merge, "m"), one + 4 * one)  # round 2 scales A and B by 2
    buf = io.BytesIO()
    torch.save(s.state_dict(), buf)
    buf.seek(0)
    t = FLoRA()
    t.load_state_dict(torch.load(buf, weights_only=True))
    assert same(t.state_dict(), s.state_dict())
    assert same(t.payload(state, specs[0]).merge, merge)


@PROPERTY
@given(
    st.integers(0, 2**31),
    st.lists(st.integers(1, 4), min_size=1, max_size=5),
    st.integers(1, 6),
    st.integers(1, 6),
)
def test_property_stack_is_exact(seed, ranks, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    specs = [ClientSpec(i, r, float(torch.randint(1, 9, (1,), generator=gen))) for i, r in enumerate(ranks)]
    s, state = started(specs, max(ranks), {"m": (d_out, d_in)}, seed)
    state = {k: v.double() for k, v in state.items()}
    results = [
        result(
            i,
            sp.rank,
            sp.alpha,
            1 + 3 * i,
            {
                **lora_state(gen, sp.rank, {"m": (d_out, d_in)}, head=None, dtype=torch.float64),
                HEAD_W: torch.ones(1, 2),
            },
        )
        for i, sp in enumerate(specs)
    ]
    before = clones([state, results])
    out = s.aggregate(state, results)
    assert same(before, [state, results])
    p = torch.tensor([x.num_examples for x in results], dtype=torch.float64)
    p = p / p.sum()
    dw = sum(pk * product(x.state, "m", x.spec.scale) for pk, x in zip(p, results, strict=True))
    torch.testing.assert_close(product(s.final_merge(out), "m"), dw, rtol=1e-10, atol=1e-10)
    for sp in specs:
        assert s.payload(out, sp).adapter[A].shape == (sp.rank, d_in)


def test_compaction_is_lossless_and_bounds_rank():
    gen = torch.Generator().manual_seed(0)
    wide = LoraPair(
        a=torch.randn(7, 3, generator=gen, dtype=torch.float64),
        b=torch.randn(4, 7, generator=gen, dtype=torch.float64),
    )
    small = compact(wide)
    assert small.rank == 3
    torch.testing.assert_close(small.b @ small.a, wide.b @ wide.a)
    assert compact(small) is small
    stacked = flora_module([wide, wide], torch.tensor([0.5, 0.25], dtype=torch.float64))
    torch.testing.assert_close(stacked.b @ stacked.a, 0.75 * wide.b @ wide.a)


def test_state_dict_counts_rounds_from_zero_and_restores_them():
    s1, s2 = hand_pair()
    results = [result(0, 1, 1.0, 1, s1), result(1, 1, 2.0, 3, s2)]
    s = FLoRA()
    template = lora_state(torch.Generator().manual_seed(0), 1, {"m": (3, 2)}, zero_b=True, head=None)
    state = s.init_state({**template, HEAD_W: torch.zeros(1, 2)}, [r.spec for r in results])
    assert s.state_dict()["rounds"] == 0 and s.final_merge(state) is None
    for expected in (1, 2, 3):
        state = s.aggregate(state, results)
        assert s.state_dict()["rounds"] == expected
    t = FLoRA()
    t.load_state_dict({**s.state_dict(), "rounds": "3"})
    assert t.state_dict()["rounds"] == 3


def test_flora_module_stacks_unequal_ranks_by_hand():
    # ranks 1 and 2, d_in = 3 (neither equals a rank): each client's rows land at its own offset
    a1, a2 = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[4.0, 5.0, 6.0], [7.0, 8.0, 9.0]])
    b1, b2 = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0, 4.0], [5.0, 6.0]])
    coeffs = torch.tensor([2.0, 0.5], dtype=torch.float64)
    want_a = torch.tensor([[2.0, 4.0, 6.0], [2.0, 2.5, 3.0], [3.5, 4.0, 4.5]])
    want_b = torch.tensor([[1.0, 3.0, 4.0], [2.0, 5.0, 6.0]])
    for dtype in (torch.float64, torch.float32):
        got = flora_module([LoraPair(a=a1, b=b1), LoraPair(a=a2, b=b2)], coeffs, dtype)
        assert got.a.dtype == dtype and got.b.dtype == dtype
        assert torch.equal(got.a, want_a.to(dtype)) and torch.equal(got.b, want_b.to(dtype))


def test_compact_refactors_a_stack_wider_than_d_out_but_not_d_in():
    # rank 3 > d_out = 2 (but <= d_in = 5): the product has rank <= 2, so the stack is re-factored
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    pair = LoraPair(a=a, b=torch.randn(2, 3, generator=gen, dtype=torch.float64))
    out = compact(pair)
    assert out.a.shape == (2, 5) and out.b.shape == (2, 2)
    torch.testing.assert_close(out.b @ out.a, pair.b @ pair.a)


@pytest.mark.parametrize("coeffs", [[0.5, 0.25, 0.25], [1.0]])
def test_flora_module_refuses_coefficients_that_do_not_match_the_clients(coeffs):
    # Truncating to the shorter list would drop a coefficient, or leave a client's rows of the
    # stacked A uninitialised (the stack is allocated for every client before it is filled).
    pairs = [LoraPair(torch.ones(1, 3), torch.ones(2, 1)), LoraPair(torch.ones(2, 3), torch.ones(2, 2))]
    with pytest.raises(ValueError, match="zip"):
        flora_module(pairs, torch.tensor(coeffs, dtype=torch.float64))


def test_flora_module_scales_half_precision_stacks_in_float32_and_rounds_once():
    # A = 1 + 3 * 2^-9 (float32), coefficient 3: the exact product 3.017578125 rounds to bfloat16
    # 3.015625. Rounding A to bfloat16 first (1.0078125) and then scaling gives 3.03125 instead.
    pairs = [LoraPair(torch.tensor([[1.005859375]]), torch.tensor([[2.0]]))]
    out = flora_module(pairs, torch.tensor([3.0], dtype=torch.float64), torch.bfloat16)
    assert out.a.dtype == torch.bfloat16 and out.b.dtype == torch.bfloat16
    assert out.a.item() == 3.015625 and out.b.item() == 2.0


def test_extend_merge_and_compact_keep_the_templates_float32():
    # A float64 stack is cast to the template's float32; a merge wider than d_in = 1 is compacted
    # to rank 1 (float64 SVD inside) and handed back in float32 with the same product.
    like = {"m.lora_A.weight": torch.zeros(1, 1), "m.lora_B.weight": torch.zeros(2, 1)}
    a64 = torch.tensor([[1.0], [2.0]], dtype=torch.float64)
    b64 = torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    merged = extend_merge({}, {"m": LoraPair(a64, b64)}, like)
    assert merged["m.lora_A.weight"].dtype == torch.float32
    assert merged["m.lora_B.weight"].dtype == torch.float32
    assert merged["m.lora_A.weight"].shape == (1, 1)
    product = merged["m.lora_B.weight"] @ merged["m.lora_A.weight"]
    torch.testing.assert_close(product, torch.tensor([[3.0], [2.0]]))
    small = compact(LoraPair(torch.tensor([[1.0], [2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]])))
    assert small.a.dtype == torch.float32 and small.b.dtype == torch.float32
