"""The shared batched per-module loop: grouping, chunking, thread policy, and batch == per module."""

import pytest
import torch
from strategy_testkit import lora_state, result

from fedlora.adapters import LoraPair, a_name, b_name
from strategies import batched
from strategies.batched import module_batches, policy_threads, thread_policy
from strategies.common import StrategyError
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


def test_thread_policy_by_size_alone_and_restores(monkeypatch):
    before = torch.get_num_threads()
    assert policy_threads(10, 8) == 1 and policy_threads(batched.SMALL_WORK - 1, 8) == 1
    assert policy_threads(batched.SMALL_WORK, 8) == 8 and policy_threads(1 << 30, 8) == 8
    assert policy_threads(1 << 30) == before  # default: the threads torch was given

    def no_load_average() -> None:
        raise AssertionError("the thread policy must not depend on the machine's load")

    monkeypatch.setattr("os.getloadavg", no_load_average)
    assert policy_threads(1 << 30, 8) == 8
    with thread_policy(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_module_batches_names_the_clients_that_lack_a_module():
    pair = LoraPair(torch.zeros(1, 3), torch.zeros(2, 1))
    global_pairs = {"m1": pair, "m2": pair}
    clients = [{"m1": pair, "m2": pair}, {"m1": pair}, {"m1": pair}]
    message = r"^client results \[1, 2\] lack the LoRA factors of module 'm2'$"
    with pytest.raises(StrategyError, match=message):
        list(module_batches(global_pairs, clients, torch.float32))


def test_the_loop_runs_each_call_on_one_thread_and_gives_the_callers_threads_to_workers():
    state, results = _problem(0, [2, 2])
    seen = []

    def fn(batch):
        seen.append((torch.get_num_threads(), policy_threads(1 << 30), policy_threads(1)))
        return batch.prev_a, batch.prev_b

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = batched.aggregate_modules(state, results, fn, torch.tensor([0.5, 0.5], dtype=torch.float64))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert len(seen) == 2 and all(s == (1, 2, 1) for s in seen)  # two shapes: two batches
    assert all(torch.equal(out[k], state[k]) for k in state)
    assert policy_threads(1 << 30, None) == torch.get_num_threads()  # outside the loop: torch's count
