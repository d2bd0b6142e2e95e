"""FLoRA's stacking refuses coefficients that do not pair up with the clients (a pass-2 survivor)."""

import pytest
import torch

from fedlora.adapters import LoraPair
from strategies.flora import flora_module


@pytest.mark.parametrize("coeffs", [[0.5, 0.25, 0.25], [1.0]])
def test_flora_module_refuses_coefficients_that_do_not_match_the_clients(coeffs):
    # Truncating to the shorter list would drop a coefficient, or leave a client's rows of the
    # stacked A uninitialised (the stack is allocated for every client before it is filled).
    pairs = [LoraPair(torch.ones(1, 3), torch.ones(2, 1)), LoraPair(torch.ones(2, 3), torch.ones(2, 2))]
    with pytest.raises(ValueError, match="zip"):
        flora_module(pairs, torch.tensor(coeffs, dtype=torch.float64))
