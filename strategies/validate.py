"""Validation of client updates before aggregation.

Flower's own aggregation lets NaN through and broadcasts wrongly shaped updates, so the server
loop checks every :class:`~strategies.base.ClientResult` against the payload it sent and drops
the ones :func:`validate_result` rejects (recording the reason). The check is pure and cheap:
names, shapes, dtypes, ranks, finiteness and the example count.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlora.adapters import is_lora_a, is_lora_b
from strategies.base import ClientResult, ClientSpec

MAX_EXAMPLES = 10**9  # an example count above this is treated as a corrupt report


def _check_examples(n: object, max_examples: int) -> str | None:
    """Return why ``n`` is not a sane example count, or None."""
    if isinstance(n, bool) or not isinstance(n, int):
        return f"num_examples must be an integer, got {n!r}"
    if not 0 < n <= max_examples:
        return f"num_examples must be in 1..{max_examples}, got {n}"
    return None


def _check_names(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str | None:
    """Return why ``state``'s tensor names differ from ``reference``'s, or None."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing:
        return f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}"
    if extra:
        return f"unexpected {len(extra)} tensor(s), e.g. {extra[0]!r}"
    return None


def _check_tensor(name: str, ref: torch.Tensor, got: object, rank: int) -> str | None:
    """Return why tensor ``got`` does not match ``ref`` (shape, dtype, rank, values), or None."""
    if not isinstance(got, torch.Tensor):
        return f"{name!r} is a {type(got).__name__}, not a torch.Tensor"
    if got.dtype != ref.dtype:
        return f"{name!r} has dtype {got.dtype}, expected {ref.dtype}"
    if got.shape != ref.shape:
        return f"{name!r} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}"
    if is_lora_a(name) and got.shape[0] != rank:
        return f"{name!r} has rank {got.shape[0]} (rows of A), but the client's rank is {rank}"
    if is_lora_b(name) and got.shape[-1] != rank:
        return f"{name!r} has rank {got.shape[-1]} (columns of B), but the client's rank is {rank}"
    if got.is_floating_point() and not bool(torch.isfinite(got).all()):
        return f"{name!r} has non-finite values"
    return None


def validate_result(
    reference_payload_state: Mapping[str, torch.Tensor],
    result: ClientResult,
    spec: ClientSpec,
    *,
    max_examples: int = MAX_EXAMPLES,
) -> str | None:
    """Return why ``result`` must be excluded from aggregation, or None when it is acceptable.

    Parameters
    ----------
    reference_payload_state
        The adapter tensors the server sent this client (``Payload.adapter``): the result must
        have exactly these names, shapes and dtypes.
    result
        The client's rebuilt adapter and example count.
    spec
        The spec the server holds for this client (rank checked against the LoRA factors).
    max_examples
        Largest plausible example count.

    Returns
    -------
    str or None
        A one-line reason naming the offending tensor or field, or None.
    """
    if result.spec != spec:
        return f"result claims spec {result.spec}, but the server expected {spec}"
    reason = _check_examples(result.num_examples, max_examples) or _check_names(
        reference_payload_state, result.state
    )
    if reason:
        return reason
    for name in sorted(reference_payload_state):
        reason = _check_tensor(name, reference_payload_state[name], result.state[name], spec.rank)
        if reason:
            return reason
    return None
