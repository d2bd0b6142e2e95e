"""FFA-LoRA: A frozen and shared, B and the head averaged, A's fingerprint sent instead of A."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_W, PROPERTY, clones, lora_state, product, result, same

from fedlora.adapters import is_lora_a
from strategies.base import ClientResult, ClientSpec
from strategies.common import StrategyError
from strategies.ffa import FINGERPRINT_KEY, FFALoRA, a_fingerprint, ffa_aggregate
from strategies.registry import create

A, B = "m.lora_A.weight", "m.lora_B.weight"
SPECS = [ClientSpec(0, 1, 2.0), ClientSpec(1, 1, 2.0)]


def test_hand_computed_b_average_keeps_a():
    state = {A: torch.tensor([[1.0, 2.0]]), B: torch.zeros(3, 1), HEAD_W: torch.zeros(1, 2)}
    s1 = {B: torch.tensor([[1.0], [0.0], [2.0]]), HEAD_W: torch.tensor([[4.0, 8.0]])}
    s2 = {B: torch.tensor([[0.0], [1.0], [-2.0]]), HEAD_W: torch.tensor([[0.0, 4.0]])}
    out = FFALoRA().aggregate(state, [result(0, 1, 2.0, 1, s1), result(1, 1, 2.0, 3, s2)])
    assert list(out) == list(state)
    assert torch.equal(out[A], state[A]) and out[A] is not state[A]
    assert torch.equal(out[B], torch.tensor([[0.25], [0.75], [-1.0]]))
    assert torch.equal(out[HEAD_W], torch.tensor([[1.0, 5.0]]))


def test_payload_omits_a_freezes_it_and_carries_its_fingerprint():
    gen = torch.Generator().manual_seed(0)
    template = lora_state(gen, 2, {"m": (3, 4), "n": (4, 4)}, zero_b=True)
    s = FFALoRA()
    state = s.init_state(template, SPECS[:1])
    p = s.payload(state, ClientSpec(0, 2, 4.0))
    assert not any(is_lora_a(k) for k in p.adapter) and B in p.adapter and HEAD_W in p.adapter
    assert p.train_a is False and p.merge is None
    assert p.extras[FINGERPRINT_KEY] == a_fingerprint(template)
    # the client computes the same digest from its own full adapter (head, B ignored)
    client_side = {**template, B: torch.ones(3, 2), HEAD_W: torch.ones(2, 3)}
    assert a_fingerprint(client_side) == p.extras[FINGERPRINT_KEY]
    assert a_fingerprint({**template, A: template[A] + 1e-3}) != p.extras[FINGERPRINT_KEY]
    assert same(s.final_adapter(state, ClientSpec(0, 2, 4.0)), state)


def test_init_rejects_zero_a_and_mixed_ranks():
    gen = torch.Generator().manual_seed(0)
    template = lora_state(gen, 1, {"m": (3, 2)}, zero_b=True)
    with pytest.raises(StrategyError, match="all zeros"):
        FFALoRA().init_state({**template, A: torch.zeros(1, 2)}, SPECS)
    with pytest.raises(StrategyError, match="hetlora"):
        FFALoRA().init_state(template, [ClientSpec(0, 1, 2.0), ClientSpec(1, 2, 4.0)])
    with pytest.raises(StrategyError, match="no"):
        ffa_aggregate({HEAD_W: torch.zeros(1)}, [{HEAD_W: torch.ones(1)}], torch.tensor([1.0]))


@PROPERTY
@given(st.integers(0, 2**31), st.integers(1, 6), st.integers(1, 4), st.integers(1, 6), st.integers(1, 6))
def test_property_product_average_is_exact(seed, k, r, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    dims = {"m": (d_out, d_in)}
    state = lora_state(gen, r, dims, dtype=torch.float64)
    results = []
    for i in range(k):
        trained = lora_state(gen, r, dims, dtype=torch.float64)
        results.append(
            result(i, r, 2.0 * r, 1 + 7 * i, {k_: v for k_, v in trained.items() if not is_lora_a(k_)})
        )
    before = clones([state, results])
    out = FFALoRA().aggregate(state, results)
    assert same(before, [state, results])
    p = torch.tensor([x.num_examples for x in results], dtype=torch.float64)
    p = p / p.sum()
    ideal = sum(pk * product({**x.state, A: state[A]}, "m") for pk, x in zip(p, results, strict=True))
    torch.testing.assert_close(product(out, "m"), ideal, rtol=1e-10, atol=1e-10)
    assert torch.equal(out[A], state[A])


def _documented_bytes(method):
    """The "down" and "up" byte counts of ``method``'s row in docs/strategies.md."""
    import re
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[2] / "docs" / "strategies.md").read_text()
    row = next(line for line in doc.splitlines() if line.startswith(f"| `{method}` | ") and " B (" in line)
    down, up = (int(m.replace(",", "")) for m in re.findall(r"\| ([\d,]+) B", row))
    return down, up


def test_ffa_sends_exactly_the_documented_bytes_half_of_fedit():
    # The documented default shapes: all-MiniLM-L6-v2 query/value (12 modules of 384 x 384), r = 8,
    # a 4-label head. FFA sends and receives B and the head only.
    from fedlora.adapters import a_name, b_name, num_bytes
    from strategies import create

    modules = [f"bert.encoder.layer.{i}.attention.self.{p}" for i in range(6) for p in ("query", "value")]
    gen = torch.Generator().manual_seed(0)
    template = {"classifier.weight": torch.zeros(4, 384), "classifier.bias": torch.zeros(4)}
    for m in modules:
        template[a_name(m)], template[b_name(m)] = torch.randn(8, 384, generator=gen), torch.zeros(384, 8)
    specs = [ClientSpec(i, 8, 16.0) for i in range(3)]
    sizes = {}
    for name in ("ffa", "fedit"):
        s = create(name)
        p = s.payload(s.init_state(template, specs), specs[0])
        trained = [k for k in p.adapter if p.train_a or not is_lora_a(k)]
        sizes[name] = (num_bytes(p.adapter), num_bytes({k: p.adapter[k] for k in trained}))
    assert sizes["ffa"] == _documented_bytes("ffa") == (153_616, 153_616)
    assert sizes["fedit"] == (301_072, 301_072)
    assert sizes["ffa"][0] == 12 * 384 * 8 * 4 + (4 * 384 + 4) * 4


H = "head.weight"


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
