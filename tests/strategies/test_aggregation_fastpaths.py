"""The fast paths behind aggregation at Llama-7B shape, each against an independent reference.

Gram-matrix SVD (FlexLoRA), LoRA-FAIR's in-cache FedIT average, the batch layout, parallel
chunking and FLoRA's stacks built in the adapter dtype. (LoRA-FAIR's vectorised Adam against
textbook Adam: ``test_fair.py``.)
"""

import pytest
import torch
from strategy_testkit import lora_state, result

from fedlora.adapters import LoraPair, a_name, b_name
from strategies import batched, fair
from strategies.batched import ModuleBatch, map_chunks, module_batches
from strategies.common import weighted_sum
from strategies.fair import LoraFAIR, fedit_mean
from strategies.flexlora import FlexLoRA, factored_svd, gram, gram_factor, gram_top_svd
from strategies.flora import FLoRA, flora_module

F64 = torch.float64


def _dense_top(b: torch.Tensor, a: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_gram_top_svd_hand_values_and_column_scale():
    # B A = diag(3, 2) on (e1, e3): sigma = (3, 2); with scale (.5, 1) it is (1.5, 2), so the order swaps
    b = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]], dtype=F64)
    a = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]], dtype=F64)
    u, s, vh = gram_top_svd(b, a, 2)
    torch.testing.assert_close(s, torch.tensor([3.0, 2.0], dtype=F64))
    torch.testing.assert_close(u.abs(), torch.eye(3, 2, dtype=F64))
    torch.testing.assert_close(vh.abs(), torch.tensor([[1.0, 0, 0, 0], [0, 0, 1.0, 0]], dtype=F64))
    u, s, vh = gram_top_svd(b, a, 1, scale=torch.tensor([0.5, 1.0]))
    torch.testing.assert_close(s, torch.tensor([2.0], dtype=F64))
    torch.testing.assert_close((u * s) @ vh, torch.tensor([[0.0] * 4, [0, 0, 2.0, 0], [0.0] * 4], dtype=F64))


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", ["random", "shared_a", "zero_b_client"])
def test_gram_top_svd_equals_the_dense_truncation(seed, kind):
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in, k_clients, r, top = 24, 20, 3, 2, 3
    a = torch.randn(k_clients * r, d_in, generator=gen, dtype=F64)
    b = torch.randn(d_out, k_clients * r, generator=gen, dtype=F64)
    if kind == "shared_a":  # clients that share A: A_cat has rank r, G_A is singular
        a = a[:r].repeat(k_clients, 1)
    if kind == "zero_b_client":
        b[:, :r] = 0.0
    scale = torch.rand(k_clients * r, generator=gen, dtype=F64) + 0.5
    u, s, vh = gram_top_svd(b, a, top, scale)
    truth = _dense_top(b * scale, a, top)
    torch.testing.assert_close((u * s) @ vh, truth, rtol=1e-9, atol=1e-9 * float(truth.norm()))
    k = s.shape[0]
    torch.testing.assert_close(vh @ vh.T, torch.eye(k, dtype=F64))
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=F64))
    assert bool((s[:-1] >= s[1:]).all())


def test_gram_top_svd_of_zero_update_is_finite_and_orthonormal():
    b, a = torch.zeros(2, 12, 4), torch.randn(2, 4, 10, generator=torch.Generator().manual_seed(0))
    u, s, vh = gram_top_svd(b, a, 3)
    assert u.shape == (2, 12, 3) and s.shape == (2, 3) and vh.shape == (2, 3, 10)
    assert not s.any() and bool(torch.isfinite(u).all()) and bool(torch.isfinite(vh).all())
    torch.testing.assert_close(vh @ vh.mT, torch.eye(3).expand(2, 3, 3))


def test_gram_top_svd_float32_agrees_with_householder_at_a_tall_shape():
    gen = torch.Generator().manual_seed(3)
    b, a = 1e-3 * torch.randn(256, 24, generator=gen), torch.randn(24, 160, generator=gen) / 20
    truth = _dense_top(b, a, 8)
    for fn in (lambda: gram_top_svd(b, a, 8), lambda: factored_svd(b, a, top=8)):
        u, s, vh = fn()
        assert u.dtype == torch.float32
        err = float(((u.double() * s.double()) @ vh.double() - truth).norm() / truth.norm())
        assert err < 1e-5


def test_gram_hand_values_and_no_overflow_for_huge_finite_factors():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    assert torch.equal(gram(x), torch.tensor([[10.0, 14.0], [14.0, 21.0]], dtype=torch.float64))
    # float32 x^T x overflows at 1e30 (1e60 > 3.4e38); the float64 result must not.
    huge = gram(x * 1e30)
    assert torch.isfinite(huge).all()
    torch.testing.assert_close(huge / 1e60, gram(x), rtol=1e-6, atol=0.0)


def test_gram_top_svd_of_huge_finite_factors_is_the_scaled_svd():
    gen = torch.Generator().manual_seed(3)
    b, a = torch.randn(64, 6, generator=gen), torch.randn(6, 48, generator=gen)
    u, s, vh = gram_top_svd(b, a, 3)
    u_h, s_h, vh_h = gram_top_svd(b * 1e30, a, 3)
    assert torch.isfinite(s_h).all() and torch.isfinite(u_h).all()
    torch.testing.assert_close(s_h / 1e30, s, rtol=1e-4, atol=0.0)
    rebuilt = u_h @ torch.diag(s_h / 1e30) @ vh_h
    torch.testing.assert_close(rebuilt, u @ torch.diag(s) @ vh, rtol=1e-4, atol=1e-4)


def test_gram_factor_hand_values_and_semidefinite_fallback():
    pd = torch.tensor([[4.0, 2.0], [2.0, 2.0]], dtype=F64)
    torch.testing.assert_close(gram_factor(pd), torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=F64))
    psd = torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64)  # rank 1: Cholesky fails, eigh is used
    both = torch.stack([pd, psd])
    low = gram_factor(both)
    torch.testing.assert_close(low @ low.mT, both)
    assert bool(torch.isfinite(low).all())


@pytest.mark.parametrize("k", [1, 2, 5, 17])
@pytest.mark.parametrize("shape", [(1, 2), (3, 5), (16, 64)])
def test_fedit_mean_has_the_bits_of_weighted_sum(k, shape):
    gen = torch.Generator().manual_seed(k)
    blocks = [torch.randn(3, *shape, generator=gen) for _ in range(k)]
    n = torch.randint(1, 50, (k,), generator=gen).double()
    w = n / n.sum()
    got = fedit_mean(blocks, w)
    for i in range(3):  # FedIT averages each module's tensors on its own
        assert torch.equal(got[i], weighted_sum([x[i] for x in blocks], w))
    transposed = fedit_mean([x.mT.contiguous() for x in blocks], w).mT  # layout does not matter
    assert torch.equal(transposed, got)


def test_weighted_sum_hand_order():
    # products rounded, then added in client order: (0.1 * 3) + (0.2 * 3) in float64
    out = weighted_sum([torch.tensor([3.0]), torch.tensor([3.0])], torch.tensor([0.1, 0.2], dtype=F64))
    assert float(out) == 0.1 * 3.0 + 0.2 * 3.0


def test_module_batch_views_and_layout():
    gen = torch.Generator().manual_seed(0)
    a = [torch.randn(2, r, 5, generator=gen) for r in (1, 3)]
    b = [torch.randn(2, 4, r, generator=gen) for r in (1, 3)]
    batch = ModuleBatch.from_clients(("x", "y"), a, b, torch.zeros(2, 3, 5), torch.zeros(2, 4, 3))
    assert batch.ranks == (1, 3) and batch.rank == 3
    assert batch.a_cat.shape == (2, 4, 5) and batch.b_cat.shape == (2, 4, 4) and batch.bt_cat.is_contiguous()
    for k in range(2):
        assert torch.equal(batch.a[k], a[k]) and torch.equal(batch.b[k], b[k])
    torch.testing.assert_close(batch.b_cat @ batch.a_cat, b[0] @ a[0] + b[1] @ a[1])


def test_module_batches_copy_in_compute_dtype_and_respect_inputs():
    gen = torch.Generator().manual_seed(1)
    dims = {"m0": (6, 5), "m1": (6, 5)}
    g = lora_state(gen, 2, dims, head=None)
    clients = [lora_state(gen, 2, dims, head=None, dtype=torch.float16) for _ in range(2)]
    gp = {m: LoraPair(g[a_name(m)], g[b_name(m)]) for m in dims}
    cp = [{m: LoraPair(c[a_name(m)], c[b_name(m)]) for m in dims} for c in clients]
    (batch,) = module_batches(gp, cp, torch.float32)
    assert batch.a_cat.dtype == torch.float32 and batch.modules == ("m0", "m1")
    assert torch.equal(batch.b[1][0], clients[1][b_name("m0")].float())


def test_map_chunks_order_threads_and_restore(monkeypatch):
    before = torch.get_num_threads()
    seen = map_chunks(lambda lo, hi: (lo, hi, torch.get_num_threads()), 7, 3, workers=2)
    assert [(lo, hi) for lo, hi, _ in seen] == [(0, 3), (3, 6), (6, 7)]
    assert all(n == 1 for *_, n in seen)
    assert torch.get_num_threads() == before
    assert map_chunks(lambda lo, hi: hi - lo, 0, 3, workers=2) == []


@pytest.mark.parametrize("strategy", ["flexlora", "fair"])
def test_parallel_workers_give_the_same_bits(monkeypatch, strategy):
    gen = torch.Generator().manual_seed(4)
    dims = {f"m{i}": (256, 48) for i in range(4)}
    results = [result(i, 2, 4.0, 3 + i, lora_state(gen, 2, dims, head=None)) for i in range(3)]
    s = FlexLoRA() if strategy == "flexlora" else LoraFAIR(steps=5)
    state = s.init_state(lora_state(gen, 2, dims, head=None, zero_b=True), [r.spec for r in results])
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # policy: one worker
    try:
        serial = s.aggregate(state, results)
        torch.set_num_threads(2)
        monkeypatch.setattr(batched, "SMALL_WORK", 0)
        monkeypatch.setattr(fair, "ADAM_CACHE_BYTES", 1)  # one module per chunk: 4 chunks, 2 workers
        parallel = s.aggregate(state, results)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(serial[k], parallel[k]) for k in state)


def test_flora_stacks_float32_adapters_in_float32():
    gen = torch.Generator().manual_seed(5)
    pairs = [LoraPair(torch.randn(2, 6, generator=gen), torch.randn(4, 2, generator=gen)) for _ in range(3)]
    coeffs = torch.tensor([0.1, 0.2, 0.3], dtype=F64)
    got = flora_module(pairs, coeffs, torch.float32)
    want = flora_module(pairs, coeffs)  # float64
    assert got.a.dtype == torch.float32 and got.b.dtype == torch.float32
    torch.testing.assert_close(got.a, want.a.float(), rtol=2.5e-7, atol=0.0)  # c rounded to float32
    assert torch.equal(got.b, want.b.float())
    dims = {"m": (4, 6)}
    specs = [result(i, 2, 4.0, 5, lora_state(gen, 2, dims)).spec for i in range(2)]
    s = FLoRA()
    state = s.init_state(lora_state(gen, 2, dims, zero_b=True), specs)
    s.aggregate(state, [result(i, 2, 4.0, 5, lora_state(gen, 2, dims)) for i in range(2)])
    assert s.final_merge(state)[a_name("m")].dtype == torch.float32
