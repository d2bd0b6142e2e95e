"""FLoRA's checkpointed state counts the aggregated rounds (behaviour seen through state_dict)."""

import torch
from strategy_testkit import HEAD_W, hand_pair, lora_state, result

from fedlora.adapters import LoraPair
from strategies.flora import FLoRA, compact, flora_module


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
