import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import HEAD_W, PROPERTY, clones, lora_state, product, result, same

from fedlora.adapters import LoraPair
from strategies.base import ClientSpec
from strategies.flexlora import FlexLoRA, factored_svd, flexlora_module, orthonormal_completion

A, B = "m.lora_A.weight", "m.lora_B.weight"


def started(specs, rank, dims, seed=0):
    s = FlexLoRA()
    gen = torch.Generator().manual_seed(seed)
    template = lora_state(gen, rank, dims, zero_b=True, head=None)
    return s, s.init_state({**template, HEAD_W: torch.zeros(1, 2)}, specs)


def truncated(dw: torch.Tensor, k: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    return (u[:, :k] * s[:k]) @ vh[:k]


def test_hand_single_client_rank_one():
    # 2 * B A = 2 * [[3, 4], [0, 0], [0, 0]]: sigma = 10, v = (0.6, 0.8); with s_g = 2, B_g = [[5], [0], [0]]
    s, state = started([ClientSpec(0, 1, 2.0)], 1, {"m": (3, 2)})
    st_k = {A: torch.tensor([[3.0, 4.0]]), B: torch.tensor([[1.0], [0.0], [0.0]]), HEAD_W: torch.ones(1, 2)}
    out = s.aggregate(state, [result(0, 1, 2.0, 5, st_k)])
    torch.testing.assert_close(out[A].abs(), torch.tensor([[0.6, 0.8]]))
    torch.testing.assert_close(out[B].abs(), torch.tensor([[5.0], [0.0], [0.0]]))
    torch.testing.assert_close(out[B] @ out[A], torch.tensor([[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(out[HEAD_W], torch.ones(1, 2))


def test_hand_two_clients_truncate_per_client():
    # p = (1/4, 3/4), s = 1: dW = [[.25, 0], [0, .75], [0, 0]]; the rank-1 client gets the .75 component
    specs = [ClientSpec(0, 1, 1.0), ClientSpec(1, 2, 2.0)]
    s, state = started(specs, 2, {"m": (3, 2)})
    s1 = {A: torch.tensor([[1.0, 0.0]]), B: torch.tensor([[1.0], [0.0], [0.0]]), HEAD_W: torch.zeros(1, 2)}
    s2 = {
        A: torch.tensor([[0.0, 1.0], [0.0, 0.0]]),
        B: torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]]),
        HEAD_W: torch.zeros(1, 2),
    }
    out = s.aggregate(state, [result(0, 1, 1.0, 1, s1), result(1, 2, 2.0, 3, s2)])
    torch.testing.assert_close(
        product(out, "m"), torch.tensor([[0.25, 0.0], [0.0, 0.75], [0.0, 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(
        product(s.payload(out, specs[0]).adapter, "m"),
        torch.tensor([[0.0, 0.0], [0.0, 0.75], [0.0, 0.0]], dtype=torch.float64),
    )
    torch.testing.assert_close(
        torch.linalg.svdvals(out[B].double()), torch.tensor([0.75, 0.25], dtype=torch.float64)
    )


@PROPERTY
@given(st.integers(0, 2**31), st.integers(1, 12), st.integers(1, 8), st.integers(1, 8))
def test_property_factored_svd_equals_dense(seed, m, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    b, a = (
        torch.randn(d_out, m, generator=gen, dtype=torch.float64),
        torch.randn(m, d_in, generator=gen, dtype=torch.float64),
    )
    u, s, vh = factored_svd(b, a)
    q = min(m, d_out, d_in)
    assert u.shape == (d_out, q) and s.shape == (q,) and vh.shape == (q, d_in)
    torch.testing.assert_close((u * s) @ vh, b @ a)
    torch.testing.assert_close(s, torch.linalg.svdvals(b @ a)[:q])
    torch.testing.assert_close(u.T @ u, torch.eye(q, dtype=torch.float64))
    torch.testing.assert_close(vh @ vh.T, torch.eye(q, dtype=torch.float64))


@PROPERTY
@given(
    st.integers(0, 2**31),
    st.lists(st.integers(1, 4), min_size=1, max_size=4),
    st.integers(1, 7),
    st.integers(1, 7),
)
def test_property_payloads_are_eckart_young_truncations(seed, ranks, d_out, d_in):
    gen = torch.Generator().manual_seed(seed)
    specs = [ClientSpec(i, r, float(torch.randint(1, 9, (1,), generator=gen))) for i, r in enumerate(ranks)]
    s, state = started(specs, max(ranks), {"m": (d_out, d_in)}, seed)
    results = [
        result(
            i,
            sp.rank,
            sp.alpha,
            1 + 2 * i,
            {
                **lora_state(gen, sp.rank, {"m": (d_out, d_in)}, head=None, dtype=torch.float64),
                HEAD_W: torch.ones(1, 2),
            },
        )
        for i, sp in enumerate(specs)
    ]
    state = {k: v.double() for k, v in state.items()}
    before = clones([state, results])
    out = s.aggregate(state, results)
    assert same(before, [state, results])
    p = torch.tensor([x.num_examples for x in results], dtype=torch.float64)
    p = p / p.sum()
    dw = sum(pk * product(x.state, "m", x.spec.scale) for pk, x in zip(p, results, strict=True))
    torch.testing.assert_close(
        product(out, "m", s.global_scale), truncated(dw, max(ranks)), rtol=1e-8, atol=1e-9
    )
    for sp in specs:
        view = s.payload(out, sp).adapter
        assert view[A].shape == (sp.rank, d_in) and view[B].shape == (d_out, sp.rank)
        torch.testing.assert_close(product(view, "m", sp.scale), truncated(dw, sp.rank), rtol=1e-8, atol=1e-9)
    a = out[A]  # rows orthonormal wherever d_in allows
    k = min(max(ranks), d_in)
    torch.testing.assert_close(a[:k] @ a[:k].T, torch.eye(k, dtype=torch.float64))


def test_zero_updates_keep_finite_orthonormal_a():
    specs = [ClientSpec(0, 2, 4.0), ClientSpec(1, 3, 6.0)]
    s, state = started(specs, 3, {"m": (5, 6)})
    gen = torch.Generator().manual_seed(1)
    results = [
        result(
            i,
            sp.rank,
            sp.alpha,
            4,
            {**lora_state(gen, sp.rank, {"m": (5, 6)}, zero_b=True, head=None), HEAD_W: torch.zeros(1, 2)},
        )
        for i, sp in enumerate(specs)
    ]
    out = s.aggregate(state, results)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    assert not out[B].any()
    torch.testing.assert_close(out[A] @ out[A].T, torch.eye(3))


def test_fewer_components_than_rank_are_completed():
    # one rank-1 client, global rank 3: one SVD component plus two orthonormal completions
    gen = torch.Generator().manual_seed(2)
    pair = lora_state(gen, 1, {"m": (4, 5)}, head=None)
    prev = torch.randn(3, 5, generator=gen)
    a, b = flexlora_module(
        [LoraPair(pair[A], pair[B])], torch.tensor([1.0], dtype=torch.float64), 3, 1.0, prev
    )
    assert a.shape == (3, 5) and b.shape == (4, 3)
    torch.testing.assert_close(a @ a.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(b @ a, product(pair, "m"))
    assert not b[:, 1:].any()


def test_orthonormal_completion_pads_beyond_dimension():
    rows = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    extra = orthonormal_completion(rows, torch.zeros(0, 2, dtype=torch.float64), 4)
    assert extra.shape == (3, 2)
    assert abs(float(extra[0] @ rows[0])) < 1e-12 and abs(float(extra[0].norm()) - 1) < 1e-12
    assert not extra[1:].any()
