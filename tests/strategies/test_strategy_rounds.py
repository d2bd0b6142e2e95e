"""Every registered method through two rounds as the server loop drives it."""

import io

import pytest
import torch
from strategy_testkit import HEAD_W, clones, lora_state, same

from strategies.base import ClientResult, ClientSpec
from strategies.registry import available, create
from strategies.validate import validate_result

UNIFORM = [ClientSpec(0, 2, 4.0), ClientSpec(1, 2, 4.0), ClientSpec(2, 2, 4.0)]
MIXED = [ClientSpec(0, 1, 2.0), ClientSpec(1, 3, 6.0), ClientSpec(2, 2, 1.0)]
SPECS = {
    "fedit": UNIFORM,
    "ffa": UNIFORM,
    "fair": UNIFORM,
    "hetlora": MIXED,
    "flexlora": MIXED,
    "flora": MIXED,
}
DIMS = {"layer.0.query": (6, 5), "layer.0.value": (6, 5)}


def train(adapter, spec, gen):
    """Stand-in for local training: perturb every received tensor."""
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in adapter.items()}
    return ClientResult(spec, 10 + 5 * spec.node_id, state)


def test_every_registered_method_is_covered():
    assert sorted(SPECS) == available()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_two_rounds(name):
    specs = SPECS[name]
    gen = torch.Generator().manual_seed(0)
    rank = max(s.rank for s in specs)
    template = {**lora_state(gen, rank, DIMS, zero_b=True, head=None), HEAD_W: torch.zeros(4, 6)}
    strategy = create(name)
    state = strategy.init_state(template, specs)
    for _ in range(2):
        payloads = {s.node_id: strategy.payload(state, s) for s in specs}
        results = [train(payloads[s.node_id].adapter, s, gen) for s in specs]
        for s, r in zip(specs, results, strict=True):
            assert validate_result(payloads[s.node_id].adapter, r, s) is None
        before = clones([state, results])
        new = strategy.aggregate(state, results)
        assert same(before, [state, results])
        assert list(new) == list(state)
        assert all(new[k].shape == state[k].shape and new[k].dtype == state[k].dtype for k in state)
        assert all(bool(torch.isfinite(v).all()) for v in new.values())
        state = new
    for s in specs:
        final = strategy.final_adapter(state, s)
        assert set(payloads[s.node_id].adapter) <= set(final)
    merge = strategy.final_merge(state)
    assert (merge is not None) == (name == "flora")
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    buf.seek(0)
    restored = create(name)
    restored.load_state_dict(torch.load(buf, weights_only=True))
    for s in specs:
        assert same(restored.payload(state, s).adapter, strategy.payload(state, s).adapter)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_a_bad_update_is_caught_before_aggregation(name):
    specs = SPECS[name]
    gen = torch.Generator().manual_seed(1)
    rank = max(s.rank for s in specs)
    template = {**lora_state(gen, rank, DIMS, zero_b=True, head=None), HEAD_W: torch.zeros(4, 6)}
    strategy = create(name)
    state = strategy.init_state(template, specs)
    adapter = strategy.payload(state, specs[0]).adapter
    bad = train(adapter, specs[0], gen)
    key = sorted(bad.state)[0]
    bad.state[key] = torch.full_like(bad.state[key], float("nan"))
    assert "non-finite" in validate_result(adapter, bad, specs[0])
