"""The strategy registry: names, parameters and their refusals, registration."""

import math

import pytest

import strategies
from strategies.base import LoraStrategy
from strategies.fair import LoraFAIR
from strategies.fedit import FedIT
from strategies.registry import RegistryError, available, create, lookup, params_of, register

NAMES = ["fair", "fedit", "ffa", "flexlora", "flora", "hetlora"]


def test_available_lists_every_builtin_sorted():
    assert available() == NAMES
    assert strategies.available() == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_create_returns_instance_with_that_name(name):
    s = create(name)
    assert isinstance(s, LoraStrategy)
    assert s.name == name
    assert lookup(name) is type(s)


def test_unknown_name_lists_valid_names():
    with pytest.raises(RegistryError) as err:
        create("fedavg")
    msg = str(err.value)
    assert "'fedavg'" in msg
    for name in NAMES:
        assert name in msg


def test_unknown_param_names_it_and_the_allowed_ones():
    with pytest.raises(RegistryError) as err:
        create("fair", lamda=0.1)
    msg = str(err.value)
    assert "'lamda'" in msg and "lam" in msg and "steps" in msg and "lr" in msg


def test_param_on_parameterless_strategy():
    with pytest.raises(RegistryError, match=r"'fedit' has no parameter 'lr'; allowed: none"):
        create("fedit", lr=0.1)


def test_params_of_and_values_pass_through():
    assert params_of("fair") == {"lam": 0.01, "steps": 100, "lr": 1e-3}
    s = create("fair", lam=math.inf, steps=0, lr=0.5)
    assert isinstance(s, LoraFAIR)
    assert (s.lam, s.steps, s.lr) == (math.inf, 0, 0.5)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"lam": -1.0}, "lam"),
        ({"lam": float("nan")}, "lam"),
        ({"lam": "big"}, "lam"),
        ({"steps": 2.5}, "steps"),
        ({"steps": -1}, "steps"),
        ({"steps": True}, "steps"),
        ({"lr": 0.0}, "lr"),
        ({"lr": math.inf}, "lr"),
    ],
)
def test_invalid_values_name_the_param(params, param):
    with pytest.raises(RegistryError, match=f"'fair'.*'{param}'"):
        create("fair", **params)


def test_register_rejects_duplicates_and_nameless_classes():
    class Other(LoraFAIR):
        name = "fair"

    with pytest.raises(RegistryError, match="already taken"):
        register(Other)
    assert lookup("fair") is LoraFAIR

    class Nameless(LoraFAIR):
        name = ""

    with pytest.raises(RegistryError, match="non-empty class attribute"):
        register(Nameless)
    assert register(LoraFAIR) is LoraFAIR  # re-registering the same class is harmless


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
