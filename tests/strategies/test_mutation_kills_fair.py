"""LoRA-FAIR's single-module helpers by hand (mutants that survived pass 3; see docs/testing.md)."""

import math

import pytest
import torch
from strategy_testkit import lora_state, result

import strategies.fair as fair
from fedlora.adapters import LoraPair
from strategies import fair_kernel
from strategies.fair import LoraFAIR, correct_batch, factored_cosine, fair_module, weighted_gram_norm
from strategies.fedit import FedIT

F64 = torch.float64


def test_fair_module_of_one_client_returns_its_factors():
    # One client: FedIT's average is (A_1, B_1) and B_1 A_1 is the ideal update, so the cosine is
    # already 1, the objective's gradient at dB = 0 vanishes and no correction is made.
    a = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    b = torch.tensor([[0.5, 0.0], [1.0, 2.0]])
    a_bar, b_new = fair_module([LoraPair(a, b)], torch.tensor([1.0], dtype=F64), 0.01, 20, 1e-2)
    assert a_bar.dtype == F64 and b_new.dtype == F64
    assert torch.equal(a_bar, a.double())
    torch.testing.assert_close(b_new, b.double(), rtol=0.0, atol=1e-9)


def test_factored_cosine_of_products_smaller_than_one():
    # B1 A1 = [[0.3, 0]], B2 A2 = [[0.4, 0.4]]: <.,.> = 0.12, norms 0.3 and 0.4 sqrt(2), so the
    # cosine is 1 / sqrt(2); the denominator's square 0.0288 is below 1 and must not be clamped up.
    b1, a1 = torch.tensor([[0.3]], dtype=F64), torch.tensor([[1.0, 0.0]], dtype=F64)
    b2, a2 = torch.tensor([[0.4]], dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64)
    assert math.isclose(float(factored_cosine(b1, a1, b2, a2)), 1 / math.sqrt(2), rel_tol=1e-12)


def test_weighted_gram_norm_by_hand():
    # B_cat = [[1, 1]], A_cat = I (m = 2), weights (0.5, 0.25): B diag(w) A = [[0.5, 0.25]], whose
    # norm sqrt(0.3125) is below 1 (a clamp at 1 or dividing by the weights would show).
    b_cat = torch.tensor([[[1.0, 1.0]]], dtype=F64)
    a_cat = torch.eye(2, dtype=F64)[None]
    norm = weighted_gram_norm(b_cat, a_cat, torch.tensor([0.5, 0.25], dtype=F64))
    assert norm.shape == (1,) and math.isclose(float(norm[0]), math.sqrt(0.3125), rel_tol=1e-15)


def two_module_results(zero_b_in: str | None = None):
    gen = torch.Generator().manual_seed(7)
    dims = {"m1": (5, 4), "m2": (5, 4)}
    states = [lora_state(gen, 2, dims, dtype=F64, head=None) for _ in range(3)]
    if zero_b_in is not None:
        for s in states:
            s[f"{zero_b_in}.lora_B.weight"] = torch.zeros(5, 2, dtype=F64)
    return states[0], [result(i, 2, 4.0, 1 + 2 * i, s) for i, s in enumerate(states)]


def test_one_adam_step_already_corrects_b():
    # steps = 1 is one Adam step from FedIT's B (then the last pass evaluates it), not "no steps".
    state, results = two_module_results()
    fedit, fair = FedIT().aggregate(state, results), LoraFAIR(steps=1).aggregate(state, results)
    for mod in ("m1", "m2"):
        assert torch.equal(fair[f"{mod}.lora_A.weight"], fedit[f"{mod}.lora_A.weight"])
        assert not torch.equal(fair[f"{mod}.lora_B.weight"], fedit[f"{mod}.lora_B.weight"])


def test_a_module_without_update_keeps_fedits_b_next_to_a_corrected_one():
    # Every client's B of m2 is zero: its ideal update is zero, so m2 keeps FedIT's B = 0 exactly,
    # while m1, in the same batch, is corrected.
    state, results = two_module_results(zero_b_in="m2")
    fedit, fair = FedIT().aggregate(state, results), LoraFAIR(steps=5).aggregate(state, results)
    assert torch.equal(fair["m2.lora_B.weight"], torch.zeros(5, 2, dtype=F64))
    assert not torch.equal(fair["m1.lora_B.weight"], fedit["m1.lora_B.weight"])


def test_fair_in_chunks_of_one_module_equals_one_chunk(monkeypatch):
    # A cache budget of one byte makes every module its own chunk: each is corrected once, in order.
    gen = torch.Generator().manual_seed(8)
    dims = {f"m{i}": (6, 3) for i in range(3)}
    states = [lora_state(gen, 2, dims, dtype=F64, head=None) for _ in range(2)]
    results = [result(i, 2, 4.0, 1 + i, s) for i, s in enumerate(states)]
    whole = LoraFAIR(steps=3).aggregate(states[0], results)
    monkeypatch.setattr(fair, "ADAM_CACHE_BYTES", 1)
    chunked = LoraFAIR(steps=3).aggregate(states[0], results)
    assert whole.keys() == chunked.keys()
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=0.0, atol=1e-15)


def test_torch_loop_matches_the_kernel_at_a_zero_and_a_small_product():
    # The two loops are independent code for one iteration; compared on module 0 with B_bar = 0
    # (q = 0 at the first step: the gradient's coefficient must be 0, den must stay real) and on
    # module 1 with a product far below 1 (q ~ 1e-6: no floor at 1 may enter q or the coefficient).
    if fair_kernel.load() is None:
        pytest.skip("no C compiler: the kernel path is not available")
    gen = torch.Generator().manual_seed(12)
    a = 1e-2 * torch.randn(2, 3, 4, generator=gen, dtype=F64)
    gram_a = a @ a.mT
    m = 1e-2 * torch.randn(2, 5, 3, generator=gen, dtype=F64)
    b_bar = 1e-2 * torch.randn(2, 5, 3, generator=gen, dtype=F64)
    b_bar[0] = 0.0
    norm_w = torch.tensor([2e-3, 5e-3], dtype=F64)
    args = (m, gram_a, norm_w, b_bar, 0.01, 20, 1e-3)
    torch_loop = correct_batch(*args, native=False)
    kernel = correct_batch(*args, native=True)
    assert bool(torch_loop[0].any()) and bool(torch_loop[1].any())
    torch.testing.assert_close(torch_loop, kernel, rtol=1e-9, atol=1e-15)


def test_defaults_are_the_documented_ones():
    # docs/strategies.md: `lam=0.01`, `steps=100`, `lr=1e-3`
    s = LoraFAIR()
    assert (s.lam, s.steps, s.lr) == (0.01, 100, 1e-3)
