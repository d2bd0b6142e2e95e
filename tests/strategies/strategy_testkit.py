"""Builders shared by the strategy tests: tiny named adapter states and client results."""

from __future__ import annotations

import torch
from hypothesis import settings

from fedlora.adapters import a_name, b_name
from strategies.base import ClientResult, ClientSpec

HEAD_W = "classifier.weight"
HEAD_B = "classifier.bias"

# Deterministic property tests: same examples every run, no timing flakiness.
PROPERTY = settings(max_examples=25, deadline=None, derandomize=True, database=None)


def lora_state(
    gen: torch.Generator,
    rank: int,
    dims: dict[str, tuple[int, int]],
    *,
    zero_b: bool = False,
    head: tuple[int, int] | None = (2, 3),
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Random state: for each module ``m`` with ``(d_out, d_in)``, A (rank x d_in) and B (d_out x rank)."""
    state: dict[str, torch.Tensor] = {}
    for m, (d_out, d_in) in dims.items():
        state[a_name(m)] = torch.randn(rank, d_in, generator=gen, dtype=dtype)
        b = torch.randn(d_out, rank, generator=gen, dtype=dtype)
        state[b_name(m)] = torch.zeros_like(b) if zero_b else b
    if head is not None:
        state[HEAD_W] = torch.randn(*head, generator=gen, dtype=dtype)
        state[HEAD_B] = torch.randn(head[0], generator=gen, dtype=dtype)
    return state


def result(node: int, rank: int, alpha: float, n: int, state: dict[str, torch.Tensor]) -> ClientResult:
    """A client result with spec ``(node, rank, alpha)``."""
    return ClientResult(spec=ClientSpec(node, rank, alpha), num_examples=n, state=state)


def product(state: dict[str, torch.Tensor], module: str, scale: float = 1.0) -> torch.Tensor:
    """Dense ``scale * B @ A`` of ``module`` in float64."""
    return scale * state[b_name(module)].double() @ state[a_name(module)].double()


def clones(obj: object) -> object:
    """Deep-copy nested dicts/lists/results of tensors for later equality checks."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: clones(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clones(v) for v in obj]
    if isinstance(obj, ClientResult):
        return ClientResult(obj.spec, obj.num_examples, clones(obj.state))
    return obj


def same(x: object, y: object) -> bool:
    """Exact structural equality of what :func:`clones` produces."""
    if isinstance(x, ClientResult):
        return same([x.spec, x.num_examples, x.state], [y.spec, y.num_examples, y.state])
    if isinstance(x, torch.Tensor):
        return isinstance(y, torch.Tensor) and x.dtype == y.dtype and torch.equal(x, y)
    if isinstance(x, dict):
        return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
    if isinstance(x, list | tuple):
        return len(x) == len(y) and all(same(a, b) for a, b in zip(x, y, strict=True))
    return x == y


def hand_pair() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Two rank-1 client states for module ``m`` (d_out = 3, d_in = 2) plus a head.

    The hand-computed tests weight them (1, 3) / 4 = (0.25, 0.75).
    """
    a, b = a_name("m"), b_name("m")
    s1 = {
        a: torch.tensor([[1.0, 2.0]]),
        b: torch.tensor([[1.0], [0.0], [2.0]]),
        HEAD_W: torch.tensor([[4.0, 8.0]]),
    }
    s2 = {
        a: torch.tensor([[3.0, 0.0]]),
        b: torch.tensor([[0.0], [1.0], [-2.0]]),
        HEAD_W: torch.tensor([[0.0, 4.0]]),
    }
    return s1, s2
