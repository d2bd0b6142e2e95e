"""HetLoRA's float64 norms and FlexLoRA's SVD helpers, by hand (mutants that survived passes 1-3).

docs/testing.md names the surviving mutants each test was written for and how the kill was checked.
"""

import pytest
import torch

import strategies.flexlora as flexlora
from fedlora.adapters import LoraPair
from strategies.flexlora import (
    flexlora_module,
    gram,
    gram_factor,
    gram_top_svd,
    orthonormal_completion,
)
from strategies.hetlora import norm_weights, product_norm

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
