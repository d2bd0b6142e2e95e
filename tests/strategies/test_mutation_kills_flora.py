"""FLoRA's stacking and merge by hand: pairing, rounding, dtypes (pass-2 survivors; docs/testing.md)."""

import pytest
import torch

from fedlora.adapters import LoraPair
from strategies.flora import compact, extend_merge, flora_module


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
