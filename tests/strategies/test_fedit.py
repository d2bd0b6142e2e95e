"""FedIT: the example-weighted average of A, B and the head, what it sends, what it refuses."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_B, HEAD_W, PROPERTY, clones, hand_pair, lora_state, result, same

from strategies.base import ClientResult, ClientSpec
from strategies.common import StrategyError
from strategies.fedit import FedIT, fedit_aggregate
from strategies.registry import create

A, B = "m.lora_A.weight", "m.lora_B.weight"


def hand_results():
    # p = (1, 3) / 4 = (0.25, 0.75); r = 1, d_out = 3, d_in = 2
    s1, s2 = hand_pair()
    return [result(0, 1, 2.0, 1, s1), result(1, 1, 2.0, 3, s2)]


def test_hand_computed_average():
    state = {k: torch.zeros_like(v) for k, v in hand_results()[0].state.items()}
    out = FedIT().aggregate(state, hand_results())
    assert list(out) == list(state)
    assert torch.equal(out[A], torch.tensor([[2.5, 0.5]]))
    assert torch.equal(out[B], torch.tensor([[0.25], [0.75], [-1.0]]))
    assert torch.equal(out[HEAD_W], torch.tensor([[1.0, 5.0]]))
    assert out[A].dtype == torch.float32


def test_payload_is_the_global_state_copy():
    state = hand_results()[0].state
    p = FedIT().payload(state, ClientSpec(0, 1, 2.0))
    assert same(p.adapter, state) and p.adapter[A] is not state[A]
    assert p.merge is None and p.train_a and dict(p.extras) == {}
    assert same(FedIT().final_adapter(state, ClientSpec(0, 1, 2.0)), state)


def test_heterogeneous_ranks_are_refused_with_advice():
    gen = torch.Generator().manual_seed(0)
    with pytest.raises(StrategyError, match="hetlora"):
        FedIT().init_state(lora_state(gen, 2, {"m": (3, 2)}), [ClientSpec(0, 2, 4.0), ClientSpec(1, 1, 2.0)])
    res = [
        result(0, 2, 4.0, 1, lora_state(gen, 2, {"m": (3, 2)})),
        result(1, 1, 2.0, 1, lora_state(gen, 1, {"m": (3, 2)})),
    ]
    with pytest.raises(StrategyError, match="flexlora"):
        FedIT().aggregate(res[0].state, res)


@PROPERTY
@given(st.integers(0, 2**31), st.integers(1, 5), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
def test_property_average_matches_definition_and_does_not_mutate(seed, k, r, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    dims = {"x": (d_out, d_in), "y": (d_in, d_out)}
    results = [result(i, r, 2.0 * r, 1 + i * 3, lora_state(gen, r, dims)) for i in range(k)]
    state = lora_state(gen, r, dims)
    before = clones([state, results])
    out = FedIT().aggregate(state, results)
    assert same(before, [state, results])
    p = torch.tensor([r_.num_examples for r_ in results], dtype=torch.float64)
    p = p / p.sum()
    for name in state:
        expected = sum(pk * r_.state[name].double() for pk, r_ in zip(p, results, strict=True))
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-6, atol=1e-6)
    assert set(out) == set(state) and HEAD_B in out


def test_pure_function_uses_like_for_dtype():
    gen = torch.Generator().manual_seed(1)
    states = [lora_state(gen, 1, {"m": (2, 2)}, dtype=torch.float64) for _ in range(2)]
    like = {k: v.float() for k, v in states[0].items()}
    out = fedit_aggregate(states, torch.tensor([0.5, 0.5], dtype=torch.float64), like)
    assert all(v.dtype == torch.float32 for v in out.values())


H = "head.weight"


MIXED = [ClientSpec(1, 1, 2.0), ClientSpec(2, 2, 4.0)]


@pytest.mark.parametrize("name", ["fedit", "ffa"])
def test_uniform_rank_errors_name_the_method(name):
    strategy = create(name)
    template = {A: torch.ones(2, 3), B: torch.zeros(4, 2)}
    with pytest.raises(StrategyError, match=rf"^strategy '{name}' needs every client at one LoRA rank"):
        strategy.init_state(template, MIXED)
    state = strategy.init_state(template, [ClientSpec(1, 2, 4.0)])
    rs = [ClientResult(s, 1, {A: torch.ones(s.rank, 3), B: torch.zeros(4, s.rank)}) for s in MIXED]
    with pytest.raises(StrategyError, match=rf"^strategy '{name}' needs every client at one LoRA rank"):
        strategy.aggregate(state, rs)


def test_init_state_returns_a_copy_of_the_template():
    for name in ("fedit", "ffa"):
        template = {A: torch.ones(1, 2), B: torch.zeros(3, 1)}
        state = create(name).init_state(template, [ClientSpec(1, 1, 2.0)])
        assert state.keys() == template.keys() and torch.equal(state[A], template[A])
        assert state[A] is not template[A]


def test_fedit_payload_is_a_copy_of_everything():
    state = {A: torch.ones(1, 2), B: torch.zeros(2, 1)}
    p = create("fedit").payload(state, ClientSpec(1, 1, 2.0))
    assert set(p.adapter) == {A, B} and p.train_a is True and p.adapter[A] is not state[A]


def test_base_defaults_through_fedit():
    fedit = create("fedit")
    state = {A: torch.ones(1, 2), B: torch.zeros(2, 1)}
    assert fedit.final_merge(state) is None and fedit.state_dict() == {}
    fedit.load_state_dict({"anything": 1})  # the default hook accepts and ignores state
    final = fedit.final_adapter(state, ClientSpec(1, 1, 2.0))
    assert isinstance(final, dict) and set(final) == {A, B} and torch.equal(final[A], state[A])
    assert fedit.dp_tensors == "all" and create("ffa").dp_tensors == "no_lora_a"
    assert create("hetlora").dp_tensors is None
