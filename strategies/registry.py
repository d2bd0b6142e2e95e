"""The registry of aggregation methods: a dict plus :func:`register` and :func:`create`.

Methods register themselves by their class attribute ``name``::

    @register
    class FedIT(LoraStrategy):
        name = "fedit"

and the server builds one from the run config with ``create("fair", lam=0.05)``.
Parameters are the keyword arguments of the class constructor; unknown names and invalid
values raise :class:`RegistryError` naming the offending parameter and the allowed ones.
"""

from __future__ import annotations

import inspect
from typing import Any, TypeVar

from strategies.base import LoraStrategy

_REGISTRY: dict[str, type[LoraStrategy]] = {}

S = TypeVar("S", bound=type[LoraStrategy])


class RegistryError(ValueError):
    """An unknown strategy name or an unknown/invalid strategy parameter."""


def register(cls: S) -> S:
    """Class decorator: add ``cls`` to the registry under ``cls.name``.

    Raises
    ------
    RegistryError
        If the class has no ``name`` or another class already holds that name.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise RegistryError(f"{cls.__qualname__} needs a non-empty class attribute 'name' to be registered")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise RegistryError(f"strategy name {name!r} is already taken by {existing.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def available() -> list[str]:
    """Return the registered strategy names, sorted."""
    return sorted(_REGISTRY)


def params_of(name: str) -> dict[str, Any]:
    """Return the parameters of strategy ``name`` and their defaults."""
    sig = inspect.signature(lookup(name).__init__)
    return {
        p.name: p.default
        for p in sig.parameters.values()
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }


def lookup(name: str) -> type[LoraStrategy]:
    """Return the class registered as ``name``.

    Raises
    ------
    RegistryError
        If ``name`` is unknown; the message lists the valid names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RegistryError(f"unknown strategy {name!r}; available: {', '.join(available())}") from None


def create(name: str, **params: Any) -> LoraStrategy:
    """Instantiate strategy ``name`` with keyword ``params``.

    Raises
    ------
    RegistryError
        If ``name`` is unknown, a parameter is not accepted by the strategy, or a value is
        invalid (the constructor's ValueError/TypeError is re-raised with the strategy name).
    """
    cls = lookup(name)
    allowed = params_of(name)
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        listing = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items()) or "none"
        raise RegistryError(f"strategy {name!r} has no parameter {unknown[0]!r}; allowed: {listing}")
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise RegistryError(f"strategy {name!r}: {err}") from err
