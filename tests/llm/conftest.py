"""Fixtures of the LLM tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    # One intra-op thread: with two cores shared by other work, two threads run several times slower.
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
