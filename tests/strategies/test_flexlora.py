"""FlexLoRA: the best rank-r_k approximation of the weighted sum of products, by factored SVD."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_W, PROPERTY, clones, lora_state, product, result, same

import strategies.flexlora as flexlora
from fedlora.adapters import LoraPair
from strategies.base import ClientSpec
from strategies.flexlora import (
    FlexLoRA,
    factored_svd,
    flexlora_module,
    gram,
    gram_factor,
    gram_top_svd,
    orthonormal_completion,
)

A, B = "m.lora_A.weight", "m.lora_B.weight"


def started(specs, rank, dims, seed=0):
    s = FlexLoRA()
    gen = torch.Generator().manual_seed(seed)
    template = lora_state(gen, rank, dims, zero_b=True, head=None)
    return s, s.init_state({**template, HEAD_W: torch.zeros(1, 2)}, specs)


def truncated(dw: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_hand_single_client_rank_one():
    # 2 * B A = 2 * [[3, 4], [0, 0], [0, 0]]: sigma = 10, v = (0.6, 0.8); with s_g = 2, B_g = [[5], [0], [0]]
    s, state = started([ClientSpec(0, 1, 2.0)], 1, {"m": (3, 2)})
    st_k = {A: torch.tensor([[3.0, 4.0]]), B: torch.tensor([[1.0], [0.0], [0.0]]), HEAD_W: torch.ones(1, 2)}
    out = s.aggregate(state, [result(0, 1, 2.0, 5, st_k)])
    torch.testing.assert_close(out[A].abs(), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(out[B].abs(), torch.tensor([[5.0], [0.0], [0.0]]))
    torch.testing.assert_close(out[B] @ out[A], torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(out[HEAD_W], torch.ones(1, 2))


def test_hand_two_clients_truncate_per_client():
    # p = (1/4, 3/4), s = 1: dW = [[.25, 0], [0, .75], [0, 0]]; the rank-1 client gets the .75 component
    specs = [ClientSpec(0, 1, 1.0), ClientSpec(1, 2, 2.0)]
    s, state = started(specs, 2, {"m": (3, 2)})
    s1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0], [0.0]]), HEAD_W: torch.zeros(1, 2)}
    s2 = {
        A: torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        B: torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
        HEAD_W: torch.zeros(1, 2),
    }
    out = s.aggregate(state, [result(0, 1, 1.0, 1, s1), result(1, 2, 2.0, 3, s2)])
    torch.testing.assert_close(
        product(out, "m"), torch.tensor([[0.25, 0.0], [0.0, 0.75], [0.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        product(s.payload(out, specs[0]).adapter, "m"),
        torch.tensor([[0.0, 0.0], [0.0, 0.75], [0.0, 0.0]], dtype=torch.float64),
    )
    torch.testing.assert_close(
        torch.linalg.svdvals(out[B].double()), torch.tensor([0.75, 0.25], dtype=torch.float64)
    )


@PROPERTY
@given(st.integers(0, 2**31), st.integers(1, 12), st.integers(1, 8), st.integers(1, 8))
def test_property_factored_svd_equals_dense(seed, m, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    b, a = (
        torch.randn(d_out, m, generator=gen, dtype=torch.float64),
        torch.randn(m, d_in, generator=gen, dtype=torch.float64),
    )
    u, s, vh = factored_svd(b, a)
    q = min(m, d_out, d_in)
    assert u.shape == (d_out, q) and s.shape == (q,) and vh.shape == (q, d_in)
    torch.testing.assert_close((u * s) @ vh, b @ a)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:q])
    torch.testing.assert_close(u.T @ u, torch.eye(q, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(q, dtype=torch.float64))


@PROPERTY
@given(
    st.integers(0, 2**31),
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.integers(1, 7),
    st.integers(1, 7),
)
def test_property_payloads_are_eckart_young_truncations(seed, ranks, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    specs = [ClientSpec(i, r, float(torch.randint(1, 9, (1,), generator=gen))) for i, r in enumerate(ranks)]
    s, state = started(specs, max(ranks), {"m": (d_out, d_in)}, seed)
    results = [
        result(
            i,
            sp.rank,
            sp.alpha,
            1 + 2 * i,
            {
                **lora_state(gen, sp.rank, {"m": (d_out, d_in)}, head=None, dtype=torch.float64),
                HEAD_W: torch.ones(1, 2),
            },
        )
        for i, sp in enumerate(specs)
    ]
    state = {k: v.double() for k, v in state.items()}
    before = clones([state, results])
    out = s.aggregate(state, results)
    assert same(before, [state, results])
    p = torch.tensor([x.num_examples for x in results], dtype=torch.float64)
    p = p / p.sum()
    dw = sum(pk * product(x.state, "m", x.spec.scale) for pk, x in zip(p, results, strict=True))
    torch.testing.assert_close(
        product(out, "m", s.global_scale), truncated(dw, max(ranks)), rtol=1e-8, atol=1e-9
    )
    for sp in specs:
        view = s.payload(out, sp).adapter
        assert view[A].shape == (sp.rank, d_in) and view[B].shape == (d_out, sp.rank)
        torch.testing.assert_close(product(view, "m", sp.scale), truncated(dw, sp.rank), rtol=1e-8, atol=1e-9)
    a = out[A]  # rows orthonormal wherever d_in allows
    k = min(max(ranks), d_in)
    torch.testing.assert_close(a[:k] @ a[:k].T, torch.eye(k, dtype=torch.float64))


def test_zero_updates_keep_finite_orthonormal_a():
    specs = [ClientSpec(0, 2, 4.0), ClientSpec(1, 3, 6.0)]
    s, state = started(specs, 3, {"m": (5, 6)})
    gen = torch.Generator().manual_seed(1)
    results = [
        result(
            i,
            sp.rank,
            sp.alpha,
            4,
            {**lora_state(gen, sp.rank, {"m": (5, 6)}, zero_b=True, head=None), HEAD_W: torch.zeros(1, 2)},
        )
        for i, sp in enumerate(specs)
    ]
    out = s.aggregate(state, results)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert not out[B].any()
    torch.testing.assert_close(out[A] @ out[A].T, torch.eye(3))


def test_fewer_components_than_rank_are_completed():
    # one rank-1 client, global rank 3: one SVD component plus two orthonormal completions
    gen = torch.Generator().manual_seed(2)
    pair = lora_state(gen, 1, {"m": (4, 5)}, head=None)
    prev = torch.randn(3, 5, generator=gen)
    a, b = flexlora_module(
        [LoraPair(pair[A], pair[B])], torch.tensor([1.0], dtype=torch.float64), 3, 1.0, prev
    )
    assert a.shape == (3, 5) and b.shape == (4, 3)
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(b @ a, product(pair, "m"))
    assert not b[:, 1:].any()


def test_orthonormal_completion_pads_beyond_dimension():
    rows = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    extra = orthonormal_completion(rows, torch.zeros(0, 2, dtype=torch.float64), 4)
    assert extra.shape == (3, 2)
    assert abs(float(extra[0] @ rows[0])) < 1e-12 and abs(float(extra[0].norm()) - 1) < 1e-12
    assert not extra[1:].any()


F32, F64 = torch.float32, torch.float64


def rank_one_case() -> tuple[list[LoraPair], torch.Tensor, torch.Tensor]:
    # one client at rank 1 (m = 1 <= min(d_out, d_in) / 2: the Gram path), values not exact in binary
    a = torch.tensor([[0.3, 0.1, 0.7, 0.2]], dtype=F32)
    b = torch.tensor([[0.1], [0.2], [0.3]], dtype=F32)
    return [LoraPair(a, b)], torch.tensor([0.7], dtype=F64), 0.7 * (b.double() @ a.double())


def two_client_case() -> tuple[list[LoraPair], torch.Tensor, torch.Tensor]:
    # two clients at rank 2 (m = 4 > d_small / 2: the factored QR path); the sum has rank <= 3
    gen = torch.Generator().manual_seed(11)
    pairs = [LoraPair(torch.randn(2, 4, generator=gen), torch.randn(3, 2, generator=gen)) for _ in range(2)]
    coeffs = torch.tensor([0.25, 1.5], dtype=F64)
    want = sum(c * (p.b.double() @ p.a.double()) for c, p in zip(coeffs, pairs, strict=True))
    return pairs, coeffs, want


@pytest.mark.parametrize("case", [rank_one_case, two_client_case])
def test_flexlora_module_computes_float32_factors_in_float64(case):
    # The global product of float32 factors is their float64 product to 1e-12 (float32 arithmetic
    # anywhere on the way leaves errors near 1e-8), A_g has orthonormal rows, results are float64.
    pairs, coeffs, want = case()
    rank, s_g = 3, 0.5
    a_g, b_g = flexlora_module(pairs, coeffs, rank, s_g, torch.zeros(rank, 4, dtype=F32))
    assert a_g.dtype == F64 and b_g.dtype == F64
    assert a_g.shape == (rank, 4) and b_g.shape == (3, rank)
    assert float((s_g * b_g @ a_g - want).abs().max()) < 1e-12
    assert float((a_g @ a_g.T - torch.eye(rank, dtype=F64)).abs().max()) < 1e-12


def test_orthonormal_completion_keeps_the_rows_dtype_whatever_the_defaults():
    # rows float32, hint float64, default dtype float64: the completion (two unit rows, then one
    # zero row beyond d = 3) must stay float32, every part of it built in the rows' dtype.
    rows = torch.tensor([[1.0, 0.0, 0.0]], dtype=F32)
    hint = torch.tensor([[0.0, 0.0, 2.0]], dtype=F64)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    try:
        extra = orthonormal_completion(rows, hint, 4)
    finally:
        torch.set_default_dtype(old)
    assert extra.dtype == F32 and extra.shape == (3, 3)
    # the hint's direction first (sign free), then the remaining axis, then a zero row
    assert torch.equal(extra[0].abs(), torch.tensor([0.0, 0.0, 1.0]))
    assert torch.equal(extra[1].abs(), torch.tensor([0.0, 1.0, 0.0]))
    assert not extra[2].any()


@pytest.mark.parametrize("svd_name", ["factored_svd", "gram_top_svd"])
@pytest.mark.parametrize("low", ["a", "b"])
def test_svds_of_mixed_dtype_factors_compute_in_float64(svd_name, low):
    # One factor float32, the other float64: both SVDs promise the compute dtype of their inputs
    # (float64), so the leading singular values and the rank-2 truncation match the dense float64
    # SVD of the exact product to 1e-12 (a float32 step anywhere leaves errors near 1e-7).
    gen = torch.Generator().manual_seed(5)
    b = torch.randn(2, 9, 3, generator=gen, dtype=F64)  # M x d_out x m: the Gram path's shape
    a = torch.randn(2, 3, 8, generator=gen, dtype=F64)
    b, a = (b.float(), a) if low == "b" else (b, a.float())
    dense = b.double() @ a.double()
    u, s, vh = getattr(flexlora, svd_name)(b, a, 2)  # looked up at run time (mutation spot-checks)
    assert u.dtype == F64 and s.dtype == F64 and vh.dtype == F64
    u_d, s_d, vh_d = torch.linalg.svd(dense, full_matrices=False)
    assert float((s - s_d[:, :2]).abs().max()) < 1e-12
    want = (u_d[..., :2] * s_d[:, None, :2]) @ vh_d[:, :2]
    assert float(((u * s[:, None, :]) @ vh - want).abs().max()) < 1e-12


def test_gram_top_svd_keeps_the_leading_subspace_when_top_is_below_m():
    # Two modules of m = 4 (two rank-2 clients), top = 2 < m: the two eigenvectors of the largest
    # eigenvalues must span U's subspace; the product's known singular values are 8, 4, 2, 1.
    gen = torch.Generator().manual_seed(3)
    q_l = torch.linalg.qr(torch.randn(2, 10, 4, generator=gen, dtype=F64)).Q  # M x d_out x 4
    q_r = torch.linalg.qr(torch.randn(2, 9, 4, generator=gen, dtype=F64)).Q  # M x d_in x 4
    sig = torch.tensor([1.0, 8.0, 2.0, 4.0], dtype=F64)  # unsorted on purpose
    b, a = q_l * sig, q_r.mT  # B A = Q_l diag(sig) Q_r^T
    u, s, vh = gram_top_svd(b, a, 2)
    assert torch.allclose(s, torch.tensor([[8.0, 4.0], [8.0, 4.0]], dtype=F64), rtol=0, atol=1e-12)
    want = (q_l[..., [1, 3]] * torch.tensor([8.0, 4.0], dtype=F64)) @ q_r[..., [1, 3]].mT
    assert float(((u * s[:, None, :]) @ vh - want).abs().max()) < 1e-12


def test_gram_rescales_each_matrix_by_its_own_largest_entry():
    # Matrix 0 overflows float32 (2^83 squared = 2^166 > 2^128) and is rescaled; matrix 1 is small
    # and exact in float32. Rescaling both by the batch's largest entry would flush matrix 1 to 0
    # (2^-93 squared underflows float32), and a shared scale of the wrong shape mixes columns.
    x = torch.zeros(2, 2, 2)
    x[0, 0, 0], x[0, 1, 1] = 2.0**83, 2.0**60
    x[1, 0, 0], x[1, 1, 1] = 2.0**-10, 2.0**-11
    g = gram(x)
    assert g.dtype == F64 and bool(torch.isfinite(g).all())
    assert torch.equal(g[0], torch.tensor([[2.0**166, 0.0], [0.0, 2.0**120]], dtype=F64))
    assert torch.equal(g[1], torch.tensor([[2.0**-20, 0.0], [0.0, 2.0**-22]], dtype=F64))


def test_gram_factor_falls_back_per_matrix_for_several_singular_grams():
    # Three rank-1 Gram matrices (Cholesky fails on each): each gets its own V sqrt(Lambda).
    grams = torch.tensor(
        [[[1.0, 1.0], [1.0, 1.0]], [[4.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 9.0]]], dtype=F64
    )
    low = gram_factor(grams)
    assert float((low @ low.mT - grams).abs().max()) < 1e-12
