"""The shared batched per-module loop: grouping, chunking, thread policy, and batch == per module."""

import torch
from strategy_testkit import lora_state, result

from fedlora.adapters import LoraPair, a_name, b_name
from strategies import batched
from strategies.batched import module_batches, policy_threads, thread_policy
from strategies.fair import LoraFAIR, fair_module
from strategies.flexlora import FlexLoRA, flexlora_module

DIMS = {"m0": (6, 5), "m1": (6, 5), "m2": (4, 7), "m3": (6, 5)}  # two shapes, interleaved


def _problem(seed, ranks, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    results = [
        result(i, r, 2.0 * r, 3 + 4 * i, lora_state(gen, r, DIMS, head=None, dtype=dtype))
        for i, r in enumerate(ranks)
    ]
    return lora_state(gen, max(ranks), DIMS, head=None, dtype=dtype), results


def test_batches_group_by_shape_and_respect_the_byte_cap():
    state, results = _problem(0, [2, 2])
    g = {m: LoraPair(state[a_name(m)], state[b_name(m)]) for m in DIMS}
    c = [{m: LoraPair(r.state[a_name(m)], r.state[b_name(m)]) for m in DIMS} for r in results]
    whole = list(module_batches(g, c, torch.float64))
    assert sorted(b.modules for b in whole) == [("m0", "m1", "m3"), ("m2",)]
    one_each = list(module_batches(g, c, torch.float64, max_bytes=1))
    assert sorted(b.modules for b in one_each) == [("m0",), ("m1",), ("m2",), ("m3",)]
    b = next(x for x in whole if x.modules[0] == "m0")
    assert b.a[1].shape == (3, 2, 5) and b.b[0].shape == (3, 6, 2) and torch.equal(b.a[1][2], c[1]["m3"].a)


def test_flexlora_batched_equals_module_by_module():
    state, results = _problem(1, [1, 3, 2])
    s = FlexLoRA()
    state = s.init_state(state, [r.spec for r in results])
    out = s.aggregate(state, results)
    p = torch.tensor([r.num_examples for r in results], dtype=torch.float64)
    coeffs = p / p.sum() * torch.tensor([r.spec.scale for r in results], dtype=torch.float64)
    for m in DIMS:
        pairs = [LoraPair(r.state[a_name(m)], r.state[b_name(m)]) for r in results]
        a, b = flexlora_module(pairs, coeffs, 3, s.global_scale, state[a_name(m)])
        torch.testing.assert_close(b @ a, out[b_name(m)] @ out[a_name(m)])


def test_fair_batched_equals_module_by_module():
    # the three same-shape modules share one vectorised Adam run (each keeps its own best iterate)
    state, results = _problem(2, [2, 2, 2])
    out = LoraFAIR(steps=40, lr=0.3).aggregate(state, results)
    p = torch.tensor([r.num_examples for r in results], dtype=torch.float64)
    for m in DIMS:
        pairs = [LoraPair(r.state[a_name(m)], r.state[b_name(m)]) for r in results]
        a, b = fair_module(pairs, p / p.sum(), 0.01, 40, 0.3)
        torch.testing.assert_close(out[a_name(m)], a)
        torch.testing.assert_close(out[b_name(m)], b, rtol=1e-9, atol=1e-12)


def test_thread_policy_by_size_and_restores(monkeypatch):
    before = torch.get_num_threads()
    assert policy_threads(10, 8) == 1
    monkeypatch.setattr(batched.os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    monkeypatch.setattr(batched.os, "cpu_count", lambda: 8)
    assert policy_threads(1 << 30, 8) == 8
    monkeypatch.setattr(batched.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    assert policy_threads(1 << 30, 8) == 1  # every core busy: extra threads only contend
    with thread_policy(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
