"""HetLoRA's float64 norms and FlexLoRA's single-module helpers, by hand (mutants that survived pass 3).

Each test names the mutation-run survivor it was written for; docs/testing.md lists them.
"""

import pytest
import torch

from fedlora.adapters import LoraPair
from strategies.flexlora import flexlora_module, orthonormal_completion
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
