import pytest
import torch
from strategy_testkit import HEAD_W, lora_state, result

from strategies.base import ClientResult, ClientSpec
from strategies.validate import validate_result

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
