"""Update validation and the registry, message by message (what an operator reads in the log)."""

import pytest
import torch

from strategies.base import ClientResult, ClientSpec, LoraStrategy
from strategies.fedit import FedIT
from strategies.registry import RegistryError, available, create, lookup, params_of, register
from strategies.validate import MAX_EXAMPLES, validate_result

A, B, H = "m.lora_A.weight", "m.lora_B.weight", "head.weight"
SPEC = ClientSpec(3, 2, 4.0)


def ref() -> dict[str, torch.Tensor]:
    return {A: torch.zeros(2, 4), B: torch.zeros(5, 2), H: torch.zeros(3)}


def check(state=None, n=10, spec=SPEC, **kw):
    return validate_result(ref(), ClientResult(spec, n, ref() if state is None else state), SPEC, **kw)


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
    assert validate_result(ints, ClientResult(SPEC, 1, ints), SPEC) is None  # integer tensors: no finiteness


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
    assert check(n=0, spec=other) == f"result claims spec {other}, but the server expected {SPEC}"


def test_lookup_and_create_messages_list_the_choices():
    names = ", ".join(available())
    with pytest.raises(RegistryError, match=f"^unknown strategy 'nope'; available: {names}$"):
        lookup("nope")
    with pytest.raises(RegistryError, match=r"^strategy 'fedit' has no parameter 'lam'; allowed: none$"):
        create("fedit", lam=1.0)
    allowed = ", ".join(f"{k} \\(default {v!r}\\)" for k, v in params_of("fair").items())
    with pytest.raises(RegistryError, match=f"^strategy 'fair' has no parameter 'a'; allowed: {allowed}$"):
        create("fair", a=1, b=2)
    assert isinstance(create("fedit"), FedIT) and lookup("fedit") is FedIT


def test_register_needs_a_string_name_and_stores_the_class():
    class NoName(LoraStrategy):
        pass

    with pytest.raises(
        RegistryError, match=r"^test_register_needs.*NoName needs a non-empty class attribute"
    ):
        register(NoName)

    class NumberName(FedIT):
        name = 7

    with pytest.raises(RegistryError, match="NumberName needs a non-empty class attribute 'name'"):
        register(NumberName)

    class Probe(FedIT):
        name = "probe-mutation-test"

    try:
        assert register(Probe) is Probe and lookup("probe-mutation-test") is Probe
        assert "probe-mutation-test" in available()

        class Taken(FedIT):
            name = "probe-mutation-test"

        with pytest.raises(
            RegistryError, match=r"^strategy name 'probe-mutation-test' is already taken by .*Probe$"
        ):
            register(Taken)
    finally:
        from strategies import registry

        registry._REGISTRY.pop("probe-mutation-test", None)
