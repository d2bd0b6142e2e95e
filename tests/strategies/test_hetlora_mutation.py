"""HetLoRA weights are per module: two same-shape modules in one batch keep their own norm weights."""

import math

import torch
from strategy_testkit import result

from fedlora.adapters import LoraPair
from strategies.base import ClientSpec
from strategies.hetlora import HetLoRA, norm_weights

A1, B1, A2, B2 = "m1.lora_A.weight", "m1.lora_B.weight", "m2.lora_A.weight", "m2.lora_B.weight"


def zero_template() -> dict[str, torch.Tensor]:
    return {A1: torch.zeros(1, 2), B1: torch.zeros(2, 1), A2: torch.zeros(1, 2), B2: torch.zeros(2, 1)}


def test_same_shape_modules_are_weighted_each_by_their_own_norms():
    # Both clients at rank 1, scale 2. Module m1: client norms 2 and 6 -> w = (1/4, 3/4).
    # Module m2: client 0 moved nothing (B = 0), client 1 norm 2 -> w = (0, 1).
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 1, 2.0)]
    s = HetLoRA()
    state = s.init_state(zero_template(), specs)
    c0 = {A1: torch.tensor([[1.0, 0.0]]), B1: torch.tensor([[1.0], [0.0]]),
          A2: torch.tensor([[8.0, 0.0]]), B2: torch.zeros(2, 1)}  # fmt: skip
    c1 = {A1: torch.tensor([[0.0, 1.0]]), B1: torch.tensor([[0.0], [3.0]]),
          A2: torch.tensor([[0.0, 1.0]]), B2: torch.tensor([[1.0], [0.0]])}  # fmt: skip
    out = s.aggregate(state, [result(0, 1, 2.0, 1, c0), result(1, 1, 2.0, 1, c1)])
    torch.testing.assert_close(out[A1], torch.tensor([[0.25, 0.75]]))
    torch.testing.assert_close(out[B1], torch.tensor([[0.25], [2.25]]))
    torch.testing.assert_close(out[A2], torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out[B2], torch.tensor([[1.0], [0.0]]))


def test_an_all_zero_module_falls_back_to_example_weights_alone():
    specs = [ClientSpec(0, 1, 2.0), ClientSpec(1, 1, 2.0)]
    s = HetLoRA()
    state = s.init_state(zero_template(), specs)
    c0 = {A1: torch.tensor([[4.0, 0.0]]), B1: torch.zeros(2, 1), A2: torch.tensor([[1.0, 0.0]]),
          B2: torch.tensor([[1.0], [0.0]])}  # fmt: skip
    c1 = {A1: torch.tensor([[0.0, 4.0]]), B1: torch.zeros(2, 1), A2: torch.tensor([[0.0, 1.0]]),
          B2: torch.tensor([[0.0], [1.0]])}  # fmt: skip
    out = s.aggregate(state, [result(0, 1, 2.0, 1, c0), result(1, 1, 2.0, 3, c1)])
    torch.testing.assert_close(out[A1], torch.tensor([[1.0, 3.0]]))  # example weights (1/4, 3/4)
    torch.testing.assert_close(out[A2], torch.tensor([[0.5, 0.5]]))  # equal norms: (1/2, 1/2)


def test_norm_weights_by_hand_with_negative_scales_and_fallbacks():
    one = LoraPair(torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    two = LoraPair(torch.tensor([[1.0]]), torch.tensor([[1.0]]))
    fallback = torch.tensor([0.5, 0.5], dtype=torch.float32)
    w = norm_weights([one, two], [-1.0, 1.0], fallback)
    assert w.dtype == torch.float64 and w.tolist() == [0.75, 0.25]
    zero = LoraPair(torch.zeros(1, 1), torch.zeros(1, 1))
    fb = norm_weights([zero, zero], [1.0, 1.0], fallback)
    assert fb.dtype == torch.float64 and fb.tolist() == [0.5, 0.5]
    assert norm_weights([one, two], [math.inf, 1.0], fallback).tolist() == [0.5, 0.5]
    tiny = LoraPair(torch.tensor([[1e-3]]), torch.tensor([[1e-3]]))
    assert norm_weights([tiny, two], [1.0, 1.0], fallback).tolist()[0] < 1e-5
