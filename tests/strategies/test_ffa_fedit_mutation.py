"""FedIT and FFA-LoRA: which method an error names, what is sent, what is kept (tiny hand values)."""

import pytest
import torch

from strategies.base import ClientResult, ClientSpec
from strategies.common import StrategyError
from strategies.ffa import FINGERPRINT_KEY, a_fingerprint, ffa_aggregate
from strategies.registry import create

A, B, H = "m.lora_A.weight", "m.lora_B.weight", "head.weight"
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


def test_ffa_refuses_a_zero_a_and_a_state_without_a():
    with pytest.raises(
        StrategyError, match=r"^FFA-LoRA needs a random non-zero frozen A, but 'n.lora_A.weight' is"
    ):
        zero_a = {"n.lora_A.weight": torch.zeros(1, 2), "n.lora_B.weight": torch.zeros(3, 1)}
        create("ffa").init_state(
            {A: torch.ones(1, 2), B: torch.zeros(3, 1), **zero_a}, [ClientSpec(1, 1, 2.0)]
        )
    with pytest.raises(
        StrategyError, match=r"^FFA-LoRA needs LoRA A factors in the global state; found none$"
    ):
        ffa_aggregate({B: torch.zeros(2, 1)}, [{B: torch.ones(2, 1)}], torch.tensor([1.0]))


def test_ffa_keeps_a_averages_b_and_head_and_keeps_name_order():
    state = {H: torch.zeros(1), A: torch.tensor([[1.0, 2.0]]), B: torch.zeros(2, 1)}
    states = [
        {H: torch.tensor([4.0]), B: torch.tensor([[2.0], [0.0]])},
        {H: torch.zeros(1), B: torch.zeros(2, 1)},
    ]
    out = ffa_aggregate(state, states, torch.tensor([0.25, 0.75]))
    assert list(out) == [H, A, B]
    assert out[A].tolist() == [[1.0, 2.0]] and out[A] is not state[A]
    assert out[B].tolist() == [[0.5], [0.0]] and out[H].tolist() == [1.0]
    ffa = create("ffa")
    rs = [
        ClientResult(ClientSpec(k, 1, 2.0), n, s) for k, (n, s) in enumerate(zip([1, 3], states, strict=True))
    ]
    assert torch.equal(ffa.aggregate(state, rs)[B], out[B])


def test_ffa_payload_leaves_a_out_and_carries_its_fingerprint():
    state = {A: torch.tensor([[1.0, 2.0]]), B: torch.zeros(2, 1), H: torch.ones(1)}
    ffa = create("ffa")
    p = ffa.payload(state, ClientSpec(1, 1, 2.0))
    assert set(p.adapter) == {B, H} and p.train_a is False
    assert p.extras == {FINGERPRINT_KEY: a_fingerprint(state)} and FINGERPRINT_KEY == "a-fingerprint"
    assert a_fingerprint(state) == a_fingerprint({A: state[A]})  # only A counts
    assert a_fingerprint(state) != a_fingerprint({A: state[A] + 1})
    final = ffa.final_adapter(state, ClientSpec(1, 1, 2.0))
    assert set(final) == {A, B, H} and final[A] is not state[A]


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
