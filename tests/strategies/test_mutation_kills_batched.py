"""Module batching refuses a client without a module of the global state (pass-3 survivors)."""

import pytest
import torch

from fedlora.adapters import LoraPair
from strategies.batched import module_batches
from strategies.common import StrategyError


def test_module_batches_names_the_clients_that_lack_a_module():
    pair = LoraPair(torch.zeros(1, 3), torch.zeros(2, 1))
    global_pairs = {"m1": pair, "m2": pair}
    clients = [{"m1": pair, "m2": pair}, {"m1": pair}, {"m1": pair}]
    message = r"^client results \[1, 2\] lack the LoRA factors of module 'm2'$"
    with pytest.raises(StrategyError, match=message):
        list(module_batches(global_pairs, clients, torch.float32))
