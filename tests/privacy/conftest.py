"""Fixtures of the privacy tests."""

import pytest
import torch
from privacy_models import tiny_peft_bert


@pytest.fixture
def peft_bert():
    return tiny_peft_bert()


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Tiny models gain nothing from intra-op threads; one thread avoids oversubscribed CI cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
