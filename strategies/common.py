"""Helpers shared by the aggregation methods: weighted averages, rank padding/slicing, scales.

Everything here is a pure function of tensors (inputs are never modified). Arithmetic runs in
float64 and results are cast back to the dtype of the reference tensor, so float32 adapters
aggregate without accumulating rounding error across many clients.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import ParamSpec, TypeVar

import torch

from fedlora.adapters import AdapterState, is_lora, is_lora_a, split_state
from strategies.base import ClientResult, ClientSpec, normalised_weights

P = ParamSpec("P")
T = TypeVar("T")


def single_threaded(fn: Callable[P, T]) -> Callable[P, T]:
    """Run ``fn`` with one torch intra-op thread, restoring the previous count afterwards.

    Aggregation works on many small matrices (r x d, r x r). When the machine is busy (a
    simulation's client workers on every core), waking BLAS/OpenMP threads for each of them
    costs milliseconds per call, about 1000x the arithmetic; one thread avoids that.
    """

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        before = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapper


class StrategyError(ValueError):
    """Client specs or results do not fit what a method assumes (message says what to change)."""


def clone_state(state: Mapping[str, torch.Tensor]) -> AdapterState:
    """Return a deep copy of ``state`` (fresh tensors, same names)."""
    return {k: v.detach().clone() for k, v in state.items()}


def weighted_sum(tensors: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Return ``sum_k weights[k] * tensors[k]`` computed in float64.

    Parameters
    ----------
    tensors
        K tensors of one shape.
    weights
        Shape (K,), any real values (they are not renormalised here).
    """
    if len(tensors) != len(weights):
        raise StrategyError(f"got {len(tensors)} tensors but {len(weights)} weights")
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) != 1:
        raise StrategyError(f"cannot average tensors of different shapes {sorted(shapes)}")
    # the rounded products w_k x_k added in client order, elementwise only: any layout of the same
    # values (e.g. LoRA-FAIR's batched factors, strategies/fair.py:fedit_mean) gives the same bits
    w = weights.to(torch.float64).tolist()
    out = torch.mul(tensors[0].detach().to(torch.float64), w[0])
    for wk, t in zip(w[1:], tensors[1:], strict=True):
        out.add_(torch.mul(t.detach().to(torch.float64), wk))
    return out


def average_named(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: torch.Tensor,
    names: Sequence[str],
    like: Mapping[str, torch.Tensor],
) -> AdapterState:
    """Return the weighted average of tensors ``names`` over ``states``, cast to ``like``'s dtypes.

    Raises
    ------
    StrategyError
        If a state lacks one of ``names``.
    """
    out: AdapterState = {}
    for name in names:
        missing = [i for i, s in enumerate(states) if name not in s]
        if missing:
            raise StrategyError(f"client results {missing} lack tensor {name!r}")
        avg = weighted_sum([s[name] for s in states], weights)
        out[name] = avg.to(like[name].dtype if name in like else states[0][name].dtype)
    return out


def average_rest(
    states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor, like: Mapping[str, torch.Tensor]
) -> AdapterState:
    """Return the weighted average of every non-LoRA tensor of ``like`` (the task head: plain FedAvg)."""
    names = sorted(k for k in like if not is_lora(k))
    return average_named(states, weights, names, like)


def example_weights(results: Sequence[ClientResult]) -> torch.Tensor:
    """Return ``p_k = n_k / sum(n)`` (float64) from the results' example counts."""
    if not results:
        raise StrategyError("aggregate needs at least one client result")
    return normalised_weights([r.num_examples for r in results])


def pad_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad ``A`` (r x d_in) to ``rank`` rows and ``B`` (d_out x r) to ``rank`` columns.

    ``B_pad @ A_pad == B @ A`` exactly: the padded rows/columns meet only zeros.
    """
    r = a.shape[0]
    if rank < r:
        raise StrategyError(f"cannot pad rank {r} down to {rank}")
    a_pad = torch.zeros(rank, a.shape[1], dtype=a.dtype)  # rank x d_in
    b_pad = torch.zeros(b.shape[0], rank, dtype=b.dtype)  # d_out x rank
    a_pad[:r] = a
    b_pad[:, :r] = b
    return a_pad, b_pad


def slice_rank(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the first ``rank`` rows of ``A`` and first ``rank`` columns of ``B`` (fresh tensors)."""
    if rank > a.shape[0]:
        raise StrategyError(f"cannot slice rank {rank} from a rank-{a.shape[0]} state")
    return a[:rank].clone(), b[:, :rank].clone()


def require_uniform(specs: Sequence[ClientSpec], method: str) -> None:
    """Raise unless all ``specs`` share one rank and one scale (methods that average A and B).

    Raises
    ------
    StrategyError
        Naming the ranks/scales found and the methods that handle heterogeneous ranks.
    """
    ranks = sorted({s.rank for s in specs})
    if len(ranks) > 1:
        raise StrategyError(
            f"strategy {method!r} needs every client at one LoRA rank, got ranks {ranks}; "
            "use 'hetlora', 'flexlora' or 'flora' for heterogeneous ranks"
        )
    scales = sorted({s.scale for s in specs})
    if len(scales) > 1:
        raise StrategyError(
            f"strategy {method!r} needs one LoRA scale alpha/r for all clients, got {scales}; "
            "give every client the same alpha"
        )


def a_tensors(state: Mapping[str, torch.Tensor]) -> AdapterState:
    """Return only the LoRA ``A`` factors of ``state`` (same tensor objects)."""
    return {k: v for k, v in state.items() if is_lora_a(k)}


def result_pairs(results: Sequence[ClientResult]) -> list[dict]:
    """Return each result's per-module LoRA pairs (see :func:`fedlora.adapters.split_state`)."""
    return [split_state(r.state)[0] for r in results]


def check_number(
    name: str, value: object, *, minimum: float, integer: bool = False, strict: bool = False
) -> float:
    """Return ``value`` as a number after checking it is a finite real ``>= minimum``.

    ``strict`` requires ``> minimum``; ``integer`` requires an int (bools are rejected).
    ``math.inf`` passes when ``integer`` is False (e.g. an infinite penalty).

    Raises
    ------
    ValueError
        Naming the parameter, the value and what is allowed.
    """
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok_type or value != value:  # value != value: NaN
        raise ValueError(f"parameter {name!r} must be {kind}, got {value!r}")
    bad = value <= minimum if strict else value < minimum
    if bad:
        relation = ">" if strict else ">="
        raise ValueError(f"parameter {name!r} must be {relation} {minimum}, got {value!r}")
    return value
