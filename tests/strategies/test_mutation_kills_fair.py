"""LoRA-FAIR's single-module helpers by hand (mutants that survived pass 3; see docs/testing.md)."""

import math

import torch

from fedlora.adapters import LoraPair
from strategies.fair import factored_cosine, fair_module

F64 = torch.float64


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
