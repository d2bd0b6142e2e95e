"""FLoRA's checkpointed state counts the aggregated rounds (behaviour seen through state_dict)."""

import torch
from strategy_testkit import HEAD_W, hand_pair, lora_state, result

from strategies.flora import FLoRA


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
