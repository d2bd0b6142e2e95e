"""Shared strategy helpers (common, base, ranked): weights, padding, fingerprints, refusals, the ranked
base and the wrapper, value by value on tiny tensors."""

import hashlib
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from strategy_testkit import PROPERTY

from fedlora.adapters import fingerprint
from strategies.base import ClientResult, ClientSpec, StrategyWrapper, normalised_weights
from strategies.common import (
    StrategyError,
    a_tensors,
    average_named,
    average_rest,
    check_number,
    clone_state,
    example_weights,
    pad_rank,
    require_uniform,
    result_pairs,
    single_threaded,
    slice_rank,
    weighted_sum,
)
from strategies.ranked import client_view, global_spec_scale
from strategies.registry import create


def test_weighted_sum_hand_values():
    xs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 0.0]])]
    w = torch.tensor([0.25, 0.75], dtype=torch.float64)
    assert torch.equal(weighted_sum(xs, w), torch.tensor([[2.5, 0.5]], dtype=torch.float64))


def test_weighted_sum_rejects_mismatches():
    with pytest.raises(StrategyError, match="different shapes"):
        weighted_sum([torch.zeros(2), torch.zeros(3)], torch.tensor([0.5, 0.5]))
    with pytest.raises(StrategyError, match="2 tensors but 1 weights"):
        weighted_sum([torch.zeros(2), torch.zeros(2)], torch.tensor([1.0]))


@PROPERTY
@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=20).filter(lambda c: sum(c) > 0))
def test_normalised_weights_sum_to_one(counts):
    w = normalised_weights(counts)
    assert w.dtype == torch.float64
    assert abs(float(w.sum()) - 1.0) < 1e-12
    assert bool((w >= 0).all())


def test_pad_and_slice_hand_values():
    a = torch.tensor([[1.0, 2.0]])  # r=1, d_in=2
    b = torch.tensor([[3.0], [4.0], [5.0]])  # d_out=3
    a_pad, b_pad = pad_rank(a, b, 3)
    assert torch.equal(a_pad, torch.tensor([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]))
    assert torch.equal(b_pad, torch.tensor([[3.0, 0.0, 0.0], [4.0, 0.0, 0.0], [5.0, 0.0, 0.0]]))
    assert torch.equal(b_pad @ a_pad, b @ a)
    a1, b1 = slice_rank(a_pad, b_pad, 1)
    assert torch.equal(a1, a) and torch.equal(b1, b)
    with pytest.raises(StrategyError):
        pad_rank(a_pad, b_pad, 2)
    with pytest.raises(StrategyError):
        slice_rank(a, b, 2)


def test_fingerprint_is_stable_and_sensitive():
    s = {"m.lora_A.weight": torch.tensor([[1.0, 2.0]]), "x": torch.tensor([3.0])}
    fp = fingerprint(s)
    assert len(fp) == 64 and int(fp, 16) >= 0
    assert fingerprint(dict(reversed(list(s.items())))) == fp  # order of insertion irrelevant
    assert fingerprint({k: v.double() for k, v in s.items()}) == fp  # hashed as float32
    assert fingerprint({**s, "x": torch.tensor([3.5])}) != fp
    assert fingerprint({"m.lora_A.weight": s["m.lora_A.weight"], "y": s["x"]}) != fp  # names count
    assert fingerprint({**s, "x": torch.tensor([[3.0]])}) != fp  # shapes count
    # The documented encoding, hashed independently: name, repr(shape), little-endian float32.
    h = hashlib.sha256()
    for name, shape, values in (("m.lora_A.weight", (1, 2), [1.0, 2.0]), ("x", (1,), [3.0])):
        h.update(name.encode() + repr(shape).encode() + np.asarray(values, dtype="<f4").tobytes())
    assert fp == h.hexdigest()
    assert fingerprint({}) == hashlib.sha256().hexdigest()


def test_require_uniform_messages():
    require_uniform([ClientSpec(0, 4, 8.0), ClientSpec(1, 4, 8.0)], "fedit")
    with pytest.raises(StrategyError, match=r"ranks \[2, 4\].*hetlora.*flexlora.*flora"):
        require_uniform([ClientSpec(0, 4, 8.0), ClientSpec(1, 2, 4.0)], "fedit")
    with pytest.raises(StrategyError, match="same alpha"):
        require_uniform([ClientSpec(0, 4, 8.0), ClientSpec(1, 4, 4.0)], "fedit")


def test_check_number():
    assert check_number("n", 3, minimum=0, integer=True) == 3
    for bad in (True, 1.0, "3", None):
        with pytest.raises(ValueError, match="'n' must be an integer"):
            check_number("n", bad, minimum=0, integer=True)
    with pytest.raises(ValueError, match="'x' must be > 0"):
        check_number("x", 0.0, minimum=0.0, strict=True)


A, B, H = "m.lora_A.weight", "m.lora_B.weight", "head.weight"


def test_single_threaded_runs_with_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert single_threaded(torch.get_num_threads)() == 1
        assert torch.get_num_threads() == 2

        @single_threaded
        def boom() -> None:
            raise RuntimeError("x")

        with pytest.raises(RuntimeError):
            boom()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_weighted_sum_does_not_renormalise_and_names_mismatches():
    out = weighted_sum([torch.tensor([1.0, 2.0]), torch.tensor([10.0, 20.0])], torch.tensor([2.0, 3.0]))
    assert out.tolist() == [32.0, 64.0] and out.dtype == torch.float64
    with pytest.raises(StrategyError, match=r"^got 2 tensors but 3 weights$"):
        weighted_sum([torch.ones(1), torch.ones(1)], torch.ones(3))
    with pytest.raises(
        StrategyError, match=r"^cannot average tensors of different shapes \[\(1,\), \(2,\)\]$"
    ):
        weighted_sum([torch.ones(2), torch.ones(1)], torch.ones(2))
    grid = weighted_sum([torch.ones(2, 2), 3 * torch.ones(2, 2)], torch.tensor([0.5, 0.5]))
    assert grid.tolist() == [[2.0, 2.0], [2.0, 2.0]]


def test_average_named_casts_to_like_or_to_the_first_state():
    states = [{H: torch.tensor([1.0], dtype=torch.float16), "x": torch.tensor([2.0])}, {H: torch.tensor([3.0],
              dtype=torch.float16), "x": torch.tensor([4.0])}]  # fmt: skip
    out = average_named(states, torch.tensor([0.5, 0.5]), [H, "x"], {H: torch.zeros(1, dtype=torch.bfloat16)})
    assert out[H].dtype == torch.bfloat16 and out[H].tolist() == [2.0]
    assert out["x"].dtype == torch.float32 and out["x"].tolist() == [3.0]
    single = average_named([{"y": torch.tensor([2.0], dtype=torch.float16)}], torch.tensor([1.0]), ["y"], {})
    assert single["y"].dtype == torch.float16 and single["y"].tolist() == [2.0]
    with pytest.raises(StrategyError, match=r"^client results \[1\] lack tensor 'y'$"):
        average_named([{"y": torch.ones(1)}, {}], torch.tensor([0.5, 0.5]), ["y"], {})


def test_average_rest_is_plain_fedavg_of_the_non_lora_tensors():
    like = {A: torch.zeros(1, 1), B: torch.zeros(1, 1), H: torch.zeros(1), "z.bias": torch.zeros(1)}
    states = [{**like, H: torch.tensor([2.0]), "z.bias": torch.tensor([4.0])}, like]
    out = average_rest(states, torch.tensor([0.25, 0.75]), like)
    assert list(out) == [H, "z.bias"] and out[H].tolist() == [0.5] and out["z.bias"].tolist() == [1.0]


def test_example_weights_and_normalised_weights():
    rs = [ClientResult(ClientSpec(i, 1, 1.0), n, {}) for i, n in enumerate([1, 3])]
    assert example_weights(rs).tolist() == [0.25, 0.75] and example_weights(rs).dtype == torch.float64
    with pytest.raises(StrategyError, match=r"^aggregate needs at least one client result$"):
        example_weights([])
    assert normalised_weights([0, 2]).tolist() == [0.0, 1.0]
    for bad in ([], [1.0, math.inf], [1.0, -0.5], [0.0, 0.0], [math.nan]):
        with pytest.raises(
            ValueError, match=r"^aggregation weights must be finite, non-negative and not all zero"
        ):
            normalised_weights(bad)


def test_pad_and_slice_rank_by_hand():
    a, b = torch.tensor([[1.0, 2.0]], dtype=torch.float64), torch.tensor([[3.0], [4.0]], dtype=torch.float64)
    ap, bp = pad_rank(a, b, 3)
    assert ap.tolist() == [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]] and bp.tolist() == [
        [3.0, 0.0, 0.0],
        [4.0, 0.0, 0.0],
    ]
    assert ap.dtype == bp.dtype == torch.float64
    same_a, _ = pad_rank(a, b, 1)
    assert same_a.tolist() == [[1.0, 2.0]]
    with pytest.raises(StrategyError, match=r"^cannot pad rank 1 down to 0$"):
        pad_rank(a, b, 0)
    sa, sb = slice_rank(ap, bp, 1)
    assert sa.tolist() == [[1.0, 2.0]] and sb.tolist() == [[3.0], [4.0]]
    sa[0, 0] = 9.0
    assert ap[0, 0] == 1.0  # fresh tensors, not views
    assert slice_rank(ap, bp, 3)[0].shape == (3, 2)
    with pytest.raises(StrategyError, match=r"^cannot slice rank 4 from a rank-3 state$"):
        slice_rank(ap, bp, 4)


def test_require_uniform_messages_name_ranks_scales_and_the_method():
    require_uniform([ClientSpec(1, 2, 4.0), ClientSpec(2, 2, 4.0)], "fedit")
    with pytest.raises(
        StrategyError,
        match=r"^strategy 'ffa' needs every client at one LoRA rank, got ranks \[2, 4\]; use 'hetlora', "
        r"'flexlora' or 'flora' for heterogeneous ranks$",
    ):
        require_uniform([ClientSpec(1, 4, 8.0), ClientSpec(2, 2, 4.0)], "ffa")
    with pytest.raises(
        StrategyError,
        match=r"^strategy 'fedit' needs one LoRA scale alpha/r for all clients, got \[1.0, 2.0\]; give every "
        r"client the same alpha$",
    ):
        require_uniform([ClientSpec(1, 2, 4.0), ClientSpec(2, 2, 2.0)], "fedit")


def test_clone_a_tensors_and_result_pairs():
    state = {A: torch.ones(1, 2, requires_grad=True), B: torch.ones(2, 1), H: torch.ones(1)}
    cl = clone_state(state)
    assert list(cl) == [A, B, H] and not cl[A].requires_grad and cl[A] is not state[A]
    assert list(a_tensors(state)) == [A] and a_tensors(state)[A] is state[A]
    pairs = result_pairs([ClientResult(ClientSpec(1, 1, 1.0), 1, state)])
    assert list(pairs[0]) == ["m"] and pairs[0]["m"].a is state[A]


def test_check_number_every_branch():
    assert check_number("lam", 0.0, minimum=0.0) == 0.0
    assert check_number("lam", math.inf, minimum=0.0) == math.inf
    assert check_number("steps", 3, minimum=1, integer=True) == 3
    assert check_number("lr", 0.5, minimum=0.0, strict=True) == 0.5
    cases = [
        (("lr", 0.0), {"minimum": 0.0, "strict": True}, "parameter 'lr' must be > 0.0, got 0.0"),
        (("lam", -1), {"minimum": 0.0}, "parameter 'lam' must be >= 0.0, got -1"),
        (("steps", 2.0), {"minimum": 1, "integer": True}, "parameter 'steps' must be an integer, got 2.0"),
        (("steps", True), {"minimum": 1, "integer": True}, "parameter 'steps' must be an integer, got True"),
        (("lam", True), {"minimum": 0.0}, "parameter 'lam' must be a number, got True"),
        (("lam", "1"), {"minimum": 0.0}, "parameter 'lam' must be a number, got '1'"),
        (("lam", math.nan), {"minimum": 0.0}, "parameter 'lam' must be a number, got nan"),
        (
            ("steps", math.inf),
            {"minimum": 1, "integer": True},
            "parameter 'steps' must be an integer, got inf",
        ),
    ]
    for args, kw, message in cases:
        with pytest.raises(ValueError) as err:
            check_number(*args, **kw)
        assert str(err.value) == message


def test_client_view_folds_only_b_and_copies_the_rest():
    state = {
        A: torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        B: torch.tensor([[1.0, 10.0]], dtype=torch.float16),
        H: torch.tensor([5.0]),
    }
    view = client_view(state, 1, 2.5)
    assert view[A].tolist() == [[1.0, 2.0]] and view[B].tolist() == [[2.5]] and view[B].dtype == torch.float16
    assert view[H].tolist() == [5.0] and view[H] is not state[H]


def test_global_rank_and_scale_come_from_the_first_spec_at_the_largest_rank():
    specs = [ClientSpec(1, 2, 4.0), ClientSpec(2, 4, 4.0), ClientSpec(3, 4, 16.0)]
    assert global_spec_scale(specs) == (4, 1.0)
    with pytest.raises(
        StrategyError, match=r"^need at least one client spec to fix the global rank and scale$"
    ):
        global_spec_scale([])


def test_ranked_strategy_lifecycle_messages_and_state_dict():
    het = create("hetlora")
    for attr in ("global_scale", "global_rank"):
        with pytest.raises(
            StrategyError, match=r"^strategy 'hetlora': call init_state or load_state_dict first$"
        ):
            getattr(het, attr)
    template = {A: torch.zeros(2, 3), B: torch.zeros(4, 2)}
    with pytest.raises(
        StrategyError,
        match=r"^the initial adapter has rank 2 but the largest client rank is 3; build the template at "
        r"rank 3$",
    ):
        het.init_state(template, [ClientSpec(1, 3, 6.0)])
    state = het.init_state(template, [ClientSpec(1, 1, 4.0), ClientSpec(2, 2, 2.0)])
    assert het.state_dict() == {"global_rank": 2, "global_scale": 1.0}
    with pytest.raises(
        StrategyError, match=r"^client 9 has rank 3, above the global rank 2 fixed at the start of the run$"
    ):
        het.payload(state, ClientSpec(9, 3, 3.0))
    small = het.payload(state, ClientSpec(1, 1, 4.0)).adapter
    assert small[A].shape == (1, 3) and small[B].shape == (4, 1)
    other = create("hetlora")
    other.load_state_dict({"global_rank": "2", "global_scale": "1.5"})
    assert other.global_rank == 2 and other.global_scale == 1.5 and isinstance(other.global_rank, int)


def test_wrapper_delegates_every_hook_to_the_inner_method():
    assert StrategyWrapper(create("fedit")).dp_tensors == "all"
    inner = create("flora")
    w = StrategyWrapper(inner)
    assert w.name == "flora" and w.dp_tensors == inner.dp_tensors
    template = {A: torch.zeros(2, 3), B: torch.zeros(4, 2), H: torch.zeros(1)}
    specs = [ClientSpec(1, 2, 4.0), ClientSpec(2, 1, 2.0)]
    state = w.init_state(template, specs)
    assert inner.state_dict() == w.state_dict() and w.state_dict()["global_rank"] == 2
    g = torch.Generator().manual_seed(0)

    def trained(spec: ClientSpec) -> dict[str, torch.Tensor]:
        shapes = {A: (spec.rank, 3), B: (4, spec.rank), H: (1,)}
        return {k: torch.randn(*shape, generator=g) for k, shape in shapes.items()}

    rs = [ClientResult(s, 5, trained(s)) for s in specs]
    new = w.aggregate(state, rs)
    merge = w.final_merge(new)
    assert (
        merge is not None
        and w.final_adapter(new, specs[0]).keys() == inner.final_adapter(new, specs[0]).keys()
    )
    assert w.payload(new, specs[1]).adapter[A].shape == (1, 3)
    saved = w.state_dict()
    fresh = StrategyWrapper(create("flora"))
    fresh.load_state_dict(saved)
    assert fresh.inner.state_dict().keys() == saved.keys()
