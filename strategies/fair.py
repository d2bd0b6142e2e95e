"""LoRA-FAIR: FedIT plus a server-side residual on B that restores the ideal update's direction.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025 (arXiv:2411.14961). Per module the server forms the FedIT
averages ``A_bar``, ``B_bar`` and the ideal update ``delta_W = sum_k p_k B_k A_k``, then solves

    min_dB  (1 - cos(delta_W, (B_bar + dB) A_bar)) + lam * ||dB||_F^2,   dB starts at 0

and sends ``A_bar`` and ``B_bar + dB``. All clients share one scale ``s`` (it multiplies both
sides of the cosine, so the objective is computed on unscaled products; ``dB`` is in the units
of the stored ``B``). Cosines are of the flattened matrices and are computed from r x r Gram
matrices, never forming a d_out x d_in product. The optimiser (Adam on the closed-form
gradient, float64) keeps the best iterate *including* ``dB = 0``, which guarantees the corrected
cosine is at least FedIT's; zero steps or an infinite ``lam`` give FedIT exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.adapters import AdapterState, LoraPair, join_state, split_state
from strategies.base import ClientResult
from strategies.common import (
    average_rest,
    check_number,
    example_weights,
    require_uniform,
    result_pairs,
    single_threaded,
    weighted_sum,
)
from strategies.fedit import FedIT
from strategies.registry import register

_TINY = 1e-300  # keeps the cosine finite (and differentiable) when a product is zero


def _frob_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Return ``<B1 A1, B2 A2>_F = sum((B1^T B2) * (A1 A2^T))`` (B: d_out x r_i, A: r_i x d_in)."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def factored_cosine(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """Return ``cos(B1 A1, B2 A2)`` of the flattened products (0 when either product is zero)."""
    num = _frob_inner(b1, a1, b2, a2)
    den_sq = _frob_inner(b1, a1, b1, a1) * _frob_inner(b2, a2, b2, a2)
    return num / torch.sqrt(den_sq.clamp_min(0.0) + _TINY)


def fair_objective(
    d_b: torch.Tensor, b_bar: torch.Tensor, m: torch.Tensor, gram_a: torch.Tensor, norm_w: float, lam: float
) -> tuple[float, torch.Tensor]:
    """Return the FAIR objective at ``dB`` and its gradient (d_out x r), in closed form.

    With ``B = B_bar + dB`` and ``Y = B A_bar``: ``<delta_W, Y> = <B, m>`` where
    ``m = B_cat A_cat A_bar^T`` (d_out x r), and ``q = ||Y||^2 = sum((B^T B) * gram_a)`` with
    ``gram_a = A_bar A_bar^T`` (r x r), so ``cos = <B, m> / (||delta_W|| sqrt(q))`` and
    ``d cos / d B = (m - (<B, m> / q) B gram_a) / (||delta_W|| sqrt(q))``.
    """
    b = b_bar + d_b
    inner = float((b * m).sum())
    q = max(float(((b.T @ b) * gram_a).sum()), 0.0)
    den = math.sqrt(norm_w**2 * q + _TINY)
    cosine = inner / den
    grad_cos = (m - (inner / q) * (b @ gram_a)) / den if q > 0.0 else m / den
    loss = 1.0 - cosine + lam * float((d_b * d_b).sum())
    return loss, -grad_cos + 2.0 * lam * d_b


def _correct(
    m: torch.Tensor,
    gram_a: torch.Tensor,
    norm_w: float,
    b_bar: torch.Tensor,
    lam: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """Return the best ``dB`` seen by Adam (``dB = 0`` included) on :func:`fair_objective`."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    d_b = torch.zeros_like(b_bar)  # d_out x r
    mom, var = torch.zeros_like(b_bar), torch.zeros_like(b_bar)
    best_loss, best = math.inf, d_b
    for t in range(1, steps + 2):  # the last pass only evaluates the final iterate
        loss, grad = fair_objective(d_b, b_bar, m, gram_a, norm_w, lam)
        if loss < best_loss:
            best_loss, best = loss, d_b
        if t > steps:
            break
        mom = beta1 * mom + (1 - beta1) * grad
        var = beta2 * var + (1 - beta2) * grad * grad
        step = (mom / (1 - beta1**t)) / ((var / (1 - beta2**t)).sqrt() + eps)
        d_b = d_b - lr * step
    return best


def fair_module(
    pairs: Sequence[LoraPair], weights: torch.Tensor, lam: float, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A_bar, B_bar + dB)`` (float64) for one module.

    Parameters
    ----------
    pairs
        Client factors at one rank r: ``A_k`` r x d_in, ``B_k`` d_out x r.
    weights
        Shape (K,), ``p_k``.
    lam, steps, lr
        Penalty on ``||dB||_F^2``, Adam steps and learning rate.
    """
    a_bar = weighted_sum([p.a for p in pairs], weights)  # r x d_in
    b_bar = weighted_sum([p.b for p in pairs], weights)  # d_out x r
    b_cat = torch.cat([w * p.b.to(torch.float64) for w, p in zip(weights, pairs, strict=True)], dim=1)
    a_cat = torch.cat([p.a.to(torch.float64) for p in pairs], dim=0)  # (K r) x d_in; delta_W = b_cat a_cat
    norm_w = math.sqrt(max(float(_frob_inner(b_cat, a_cat, b_cat, a_cat)), 0.0))
    if steps == 0 or math.isinf(lam) or norm_w == 0.0:
        return a_bar, b_bar
    m = b_cat @ (a_cat @ a_bar.T)  # d_out x r
    return a_bar, b_bar + _correct(m, a_bar @ a_bar.T, norm_w, b_bar, lam, steps, lr)


@single_threaded
def fair_aggregate(
    state: AdapterState, results: Sequence[ClientResult], lam: float, steps: int, lr: float
) -> AdapterState:
    """Return the next global state: FedIT averages with the corrected ``B`` per module."""
    p = example_weights(results)
    client_pairs = result_pairs(results)
    global_pairs, _ = split_state(state)
    out: dict[str, LoraPair] = {}
    for module, g in global_pairs.items():
        a, b = fair_module([cp[module] for cp in client_pairs], p, lam, steps, lr)
        out[module] = LoraPair(a=a.to(g.a.dtype), b=b.to(g.b.dtype))
    new = join_state(out, average_rest([r.state for r in results], p, state))
    return {k: new[k] for k in state}


@register
class LoraFAIR(FedIT):
    """FedIT with a server-side correction of ``B`` towards the ideal average update.

    Parameters
    ----------
    lam
        Penalty on the correction's size (``math.inf`` disables it), >= 0.
    steps
        Adam steps per module and round (0 disables the correction), >= 0.
    lr
        Adam learning rate, > 0.
    """

    name = "fair"
    dp_tensors = None  # fits B to the clients' individual products: not a noisy sum

    def __init__(self, *, lam: float = 0.01, steps: int = 100, lr: float = 1e-3) -> None:
        self.lam = float(check_number("lam", lam, minimum=0.0))
        self.steps = int(check_number("steps", steps, minimum=0, integer=True))
        self.lr = float(check_number("lr", lr, minimum=0.0, strict=True))
        if math.isinf(self.lr):
            raise ValueError(f"parameter 'lr' must be finite, got {lr!r}")

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Average A and B, then correct B per module."""
        require_uniform([r.spec for r in results], self.name)
        return fair_aggregate(state, results, self.lam, self.steps, self.lr)
