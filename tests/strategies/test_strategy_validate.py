"""Update validation: every refusal names the offending tensor or field, as an operator reads it."""

import pytest
import torch
from strategy_testkit import HEAD_W, lora_state, result

from strategies.base import ClientResult, ClientSpec
from strategies.validate import MAX_EXAMPLES, validate_result

SPEC = ClientSpec(7, 2, 4.0)
A, B = "m.lora_A.weight", "m.lora_B.weight"


def reference() -> dict[str, torch.Tensor]:
    return lora_state(torch.Generator().manual_seed(0), 2, {"m": (3, 4)})


def with_state(**changes) -> ClientResult:
    state = {k: v.clone() + 0.1 for k, v in reference().items()}
    for k, v in changes.items():
        name = {"a": A, "b": B, "head": HEAD_W}[k]
        if v is None:
            del state[name]
        else:
            state[name] = v
    return result(7, 2, 4.0, 10, state)


def test_good_result_passes():
    assert validate_result(reference(), with_state(), SPEC) is None


@pytest.mark.parametrize(
    ("res", "needle"),
    [
        (with_state(a=None), "missing 1 tensor(s), e.g. 'm.lora_A.weight'"),
        (with_state(head=torch.zeros(2, 3, dtype=torch.float64)), "dtype torch.float64"),
        (with_state(b=torch.zeros(3, 3)), "shape (3, 3), expected (3, 2)"),
        (with_state(a=torch.full((2, 4), float("nan"))), "'m.lora_A.weight' has non-finite"),
        (with_state(b=torch.full((3, 2), float("inf"))), "'m.lora_B.weight' has non-finite"),
        (with_state(head=[[0.0] * 3] * 2), "is a list, not a torch.Tensor"),
    ],
)
def test_bad_tensors_are_named(res, needle):
    reason = validate_result(reference(), res, SPEC)
    assert reason is not None and needle in reason


def test_unexpected_tensor():
    res = with_state()
    res.state["extra.weight"] = torch.zeros(1)
    assert "unexpected 1 tensor(s), e.g. 'extra.weight'" in validate_result(reference(), res, SPEC)


@pytest.mark.parametrize(
    ("n", "needle"),
    [(0, "1..1000"), (-3, "1..1000"), (10**4, "1..1000"), (2.0, "integer"), (True, "integer")],
)
def test_example_count(n, needle):
    res = ClientResult(SPEC, n, with_state().state)
    reason = validate_result(reference(), res, SPEC, max_examples=1000)
    assert reason is not None and needle in reason


def test_spec_mismatch_and_rank_check():
    res = result(8, 2, 4.0, 10, with_state().state)
    assert "server expected" in validate_result(reference(), res, SPEC)
    # a reference built at another rank than the spec: the rank check names the factor
    spec3 = ClientSpec(7, 3, 6.0)
    res3 = ClientResult(spec3, 5, with_state().state)
    assert "rank 2 (rows of A)" in validate_result(reference(), res3, spec3)


def test_validate_does_not_mutate():
    ref, res = reference(), with_state()
    before = {k: v.clone() for k, v in res.state.items()}
    validate_result(ref, res, SPEC)
    assert all(torch.equal(before[k], res.state[k]) for k in before)


H = "head.weight"


SPEC3 = ClientSpec(3, 2, 4.0)


def ref() -> dict[str, torch.Tensor]:
    return {A: torch.zeros(2, 4), B: torch.zeros(5, 2), H: torch.zeros(3)}


def check(state=None, n=10, spec=SPEC3, **kw):
    return validate_result(ref(), ClientResult(spec, n, ref() if state is None else state), SPEC3, **kw)


def test_example_counts_at_and_beyond_the_limits():
    assert MAX_EXAMPLES == 10**9
    assert check(n=1) is None and check(n=10**9) is None
    assert check(n=10**9 + 1) == "num_examples must be in 1..1000000000, got 1000000001"
    assert check(n=0, max_examples=5) == "num_examples must be in 1..5, got 0"
    assert check(n=5, max_examples=5) is None
    assert check(n=True) == "num_examples must be an integer, got True"
    assert check(n=3.0) == "num_examples must be an integer, got 3.0"


def test_names_report_the_count_and_the_first_sorted_name():
    two_missing = {B: torch.zeros(5, 2)}
    assert check(two_missing) == "missing 2 tensor(s), e.g. 'head.weight'"
    extra = {**ref(), "z.weight": torch.zeros(1), "y.weight": torch.zeros(1)}
    assert check(extra) == "unexpected 2 tensor(s), e.g. 'y.weight'"
    assert check({**two_missing, "y.weight": torch.zeros(1)}) == "missing 2 tensor(s), e.g. 'head.weight'"


def test_each_tensor_check_names_tensor_and_values():
    assert check({**ref(), H: [0.0] * 3}) == "'head.weight' is a list, not a torch.Tensor"
    assert check({**ref(), H: torch.zeros(3, dtype=torch.float16)}) == (
        "'head.weight' has dtype torch.float16, expected torch.float32"
    )
    assert check({**ref(), H: torch.zeros(4)}) == "'head.weight' has shape (4,), expected (3,)"
    assert (
        check({**ref(), H: torch.tensor([0.0, float("nan"), 0.0])}) == "'head.weight' has non-finite values"
    )
    ints = {A: torch.zeros(2, 4, dtype=torch.int64)}
    # integer tensors: no finiteness check
    assert validate_result(ints, ClientResult(SPEC3, 1, ints), SPEC3) is None


def test_the_first_bad_tensor_in_name_order_is_reported():
    bad = {A: torch.full((2, 4), float("inf")), B: torch.zeros(5, 2), H: torch.zeros(4)}
    assert check(bad) == "'head.weight' has shape (4,), expected (3,)"  # 'head' sorts before 'm.lora_A'


def test_rank_of_each_factor_is_checked_against_the_spec():
    spec3 = ClientSpec(3, 3, 6.0)
    state = ref()
    assert validate_result(ref(), ClientResult(spec3, 1, state), spec3) == (
        "'m.lora_A.weight' has rank 2 (rows of A), but the client's rank is 3"
    )
    b_only = {B: torch.zeros(5, 2)}
    assert validate_result(b_only, ClientResult(spec3, 1, b_only), spec3) == (
        "'m.lora_B.weight' has rank 2 (columns of B), but the client's rank is 3"
    )
    a_only = {A: torch.zeros(3, 2)}  # 3 rows: right rank, even though it has 2 columns
    assert validate_result(a_only, ClientResult(spec3, 1, a_only), spec3) is None


def test_spec_mismatch_is_reported_first():
    other = ClientSpec(3, 2, 8.0)
    assert check(n=0, spec=other) == f"result claims spec {other}, but the server expected {SPEC3}"
