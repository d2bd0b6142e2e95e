"""HetLoRA: heterogeneous ranks by zero-padding, with sparsity-weighted aggregation.

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device
Foundation Models", EMNLP 2024 (arXiv:2401.06432). Client ``k`` trains rank ``r_k``; the server
zero-pads its ``A_k`` (rows) and ``B_k`` (columns) to the global rank ``R`` and averages, per
module, with weights proportional to the Frobenius norm of the client's update::

    w_k = ||s_k B_k A_k||_F / sum_j ||s_j B_j A_j||_F
    A_g = sum_k w_k pad(A_k),   B_g = sum_k w_k pad((s_k / s_g) B_k)

(example-count weights when every norm is zero, e.g. round 1 with ``B = 0``). Client ``k`` then
receives the first ``r_k`` components of the global state. The paper's optional rank
self-pruning is not implemented: client ranks stay fixed for the run.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters import AdapterState, LoraPair, join_state, split_state
from strategies.base import ClientResult
from strategies.common import (
    average_rest,
    example_weights,
    pad_rank,
    result_pairs,
    single_threaded,
    weighted_sum,
)
from strategies.ranked import RankedStrategy
from strategies.registry import register


def product_norm(a: torch.Tensor, b: torch.Tensor) -> float:
    """Return ``||B @ A||_F`` without forming ``B @ A`` (``tr(B^T B A A^T)``; A: r x d_in, B: d_out x r)."""
    a64, b64 = a.to(torch.float64), b.to(torch.float64)
    sq = ((b64.T @ b64) * (a64 @ a64.T)).sum()  # r x r Gram matrices
    return float(sq.clamp_min(0.0).sqrt())


def norm_weights(pairs: Sequence[LoraPair], scales: Sequence[float], fallback: torch.Tensor) -> torch.Tensor:
    """Return ``w_k`` proportional to ``||s_k B_k A_k||_F`` (``fallback`` when all norms are zero)."""
    norms = torch.tensor(
        [abs(s) * product_norm(p.a, p.b) for p, s in zip(pairs, scales, strict=True)], dtype=torch.float64
    )
    total = norms.sum()
    if not torch.isfinite(total) or total <= 0:
        return fallback.to(torch.float64)
    return norms.to(torch.float64) / total


def hetlora_module(
    pairs: Sequence[LoraPair], scales: Sequence[float], global_scale: float, rank: int, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate one module's client factors into global ``(A_g, B_g)`` at ``rank`` (float64).

    Parameters
    ----------
    pairs
        Client factors, ``A_k``: r_k x d_in, ``B_k``: d_out x r_k.
    scales
        The clients' ``s_k``; ``global_scale`` is ``s_g`` of the returned factors.
    rank
        The global rank ``R >= max r_k``.
    fallback
        Shape (K,), example-count weights used when every update is zero.
    """
    w = norm_weights(pairs, scales, fallback)
    padded = [
        pad_rank(p.a.to(torch.float64), p.b.to(torch.float64) * (s / global_scale), rank)
        for p, s in zip(pairs, scales, strict=True)
    ]  # (R x d_in, d_out x R) per client
    return weighted_sum([a for a, _ in padded], w), weighted_sum([b for _, b in padded], w)


@single_threaded
def hetlora_aggregate(
    state: AdapterState, results: Sequence[ClientResult], global_scale: float
) -> AdapterState:
    """Return the next global state (rank and dtypes of ``state``) from heterogeneous-rank results."""
    fallback = example_weights(results)
    client_pairs = result_pairs(results)
    global_pairs, _ = split_state(state)
    scales = [r.spec.scale for r in results]
    out: dict[str, LoraPair] = {}
    for module, g in global_pairs.items():
        a, b = hetlora_module([cp[module] for cp in client_pairs], scales, global_scale, g.rank, fallback)
        out[module] = LoraPair(a=a.to(g.a.dtype), b=b.to(g.b.dtype))
    new = join_state(out, average_rest([r.state for r in results], fallback, state))
    return {k: new[k] for k in state}


@register
class HetLoRA(RankedStrategy):
    """Zero-pad heterogeneous ranks to ``R``; per-module norm-weighted average."""

    name = "hetlora"

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Pad every client to the global rank, fold scales, and average with norm weights."""
        return hetlora_aggregate(state, results, self.global_scale)
