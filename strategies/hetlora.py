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

from fedlora.adapters import AdapterState, LoraPair
from strategies.base import ClientResult
from strategies.batched import ModuleBatch, aggregate_modules, thread_policy
from strategies.common import example_weights
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


def hetlora_batch(
    batch: ModuleBatch, scales: Sequence[float], global_scale: float, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aggregate a batch of same-shape modules into global ``(A_g, B_g)`` (M x R x d_in, M x d_out x R).

    Parameters
    ----------
    batch
        Client ``k``'s factors ``A_k``: M x r_k x d_in, ``B_k``: M x d_out x r_k.
    scales
        The clients' ``s_k``; ``global_scale`` is ``s_g`` of the returned factors.
    fallback
        Shape (K,), example-count weights used for a module whose updates are all zero.
    """
    # ||s_k B_k A_k||_F per module and client from r_k x r_k Gram matrices: M x K, float64
    d, r = max(batch.prev_a.shape[-1], batch.prev_b.shape[-2]), batch.rank
    with thread_policy(d * r * r):
        return _hetlora_batch(batch, scales, global_scale, fallback)


def _hetlora_batch(
    batch: ModuleBatch, scales: Sequence[float], global_scale: float, fallback: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    norms = torch.stack(
        [
            abs(s) * ((b.mT @ b) * (a @ a.mT)).sum((-2, -1)).to(torch.float64).clamp_min(0.0).sqrt()
            for s, a, b in zip(scales, batch.a, batch.b, strict=True)
        ],
        dim=1,
    )
    total = norms.sum(1, keepdim=True)  # M x 1
    usable = torch.isfinite(total) & (total > 0)
    w = torch.where(usable, norms / torch.where(usable, total, 1.0), fallback.to(torch.float64)[None])
    a_g, b_g = torch.zeros_like(batch.prev_a), torch.zeros_like(batch.prev_b)  # zero-padded sums
    for k, (s, a, b) in enumerate(zip(scales, batch.a, batch.b, strict=True)):
        wk = w[:, k].to(a_g.dtype)[:, None, None]  # M x 1 x 1
        a_g[:, : a.shape[1]].add_(a * wk)
        b_g[..., : b.shape[2]].add_(b * (wk * (s / global_scale)))
    return a_g, b_g


def hetlora_aggregate(
    state: AdapterState, results: Sequence[ClientResult], global_scale: float
) -> AdapterState:
    """Return the next global state (rank and dtypes of ``state``) from heterogeneous-rank results."""
    fallback = example_weights(results)
    scales = [r.spec.scale for r in results]
    return aggregate_modules(
        state, results, lambda batch: hetlora_batch(batch, scales, global_scale, fallback), fallback
    )


@register
class HetLoRA(RankedStrategy):
    """Zero-pad heterogeneous ranks to ``R``; per-module norm-weighted average."""

    name = "hetlora"
    dp_refusal = (
        "HetLoRA zero-pads heterogeneous ranks and weights clients by data-dependent update norms, so one "
        "client's influence is not bounded by C"
    )

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Pad every client to the global rank, fold scales, and average with norm weights."""
        return hetlora_aggregate(state, results, self.global_scale)
