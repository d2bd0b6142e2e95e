"""LoRA-FAIR: FedIT plus a server-side residual on B that restores the ideal update's direction.

Bian, Wang, Zhang, Xu, "LoRA-FAIR: Federated LoRA Fine-Tuning with Aggregation and
Initialization Refinement", ICCV 2025 (arXiv:2411.14961). Per module the server forms the FedIT
averages ``A_bar``, ``B_bar`` and the ideal update ``delta_W = sum_k p_k B_k A_k``, then solves

    min_dB  (1 - cos(delta_W, (B_bar + dB) A_bar)) + lam * ||dB||_F^2,   dB starts at 0

and sends ``A_bar`` and ``B_bar + dB``. All clients share one scale ``s`` (it multiplies both
sides of the cosine, so the objective is computed on unscaled products; ``dB`` is in the units
of the stored ``B``). Cosines are of the flattened matrices and are computed from r x r Gram
matrices, never forming a d_out x d_in product. The optimiser (Adam on the closed-form
gradient, in the factors' precision: float32 for real adapters, float64 where the factors are)
keeps the best iterate *including* ``dB = 0``, which guarantees the corrected
cosine is at least FedIT's; zero steps or an infinite ``lam`` give FedIT exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedlora.adapters import AdapterState, LoraPair
from strategies.base import ClientResult
from strategies.batched import ModuleBatch, aggregate_modules, map_chunks, policy_threads, thread_policy
from strategies.common import check_number, example_weights, require_uniform
from strategies.fedit import FedIT
from strategies.registry import register

ADAM_CACHE_BYTES = 4 << 20  # working set of one vectorised Adam chunk (fits a core's L2/L3 share)
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


def _vdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Return ``<x[i], y[i]>_F`` per leading index (M x ... -> M), without a temporary product."""
    return torch.linalg.vecdot(x.flatten(1), y.flatten(1))


def fedit_mean(blocks: Sequence[torch.Tensor], weights: torch.Tensor) -> torch.Tensor:
    """Return ``sum_k weights[k] * blocks[k]`` in float64, bit-identical to FedIT's average.

    The same arithmetic as :func:`~strategies.common.weighted_sum` (what FedIT uses: rounded
    products ``w_k x_k`` added in client order, elementwise), module by module in place with two
    module-sized float64 buffers that stay in cache. Blocks: M x ... each (contiguous per module
    is fastest).
    """
    w = weights.to(torch.float64).tolist()
    out = torch.empty(blocks[0].shape, dtype=torch.float64)
    tmp = torch.empty(blocks[0].shape[1:], dtype=torch.float64)
    for i in range(out.shape[0]):
        acc = out[i]
        acc.copy_(blocks[0][i]).mul_(w[0])
        for wk, x in zip(w[1:], blocks[1:], strict=True):
            acc.add_(tmp.copy_(x[i]).mul_(wk))
    return out


def weighted_gram_norm(b_cat: torch.Tensor, a_cat: torch.Tensor, cw: torch.Tensor) -> torch.Tensor:
    """Return ``||B_cat diag(cw) A_cat||_F`` per module (... x d_out x m, ... x m x d_in -> (...)).

    ``||B D A||^2 = sum((D B^T B D) * (A A^T))`` from m x m Gram matrices, never a d_out x d_in
    product.
    """
    g_b = (b_cat.mT @ b_cat) * (cw[:, None] * cw[None, :])
    return (g_b * (a_cat @ a_cat.mT)).sum((-2, -1)).clamp_min(0.0).sqrt()


def correct_batch(
    m: torch.Tensor,
    gram_a: torch.Tensor,
    norm_w: torch.Tensor,
    b_bar: torch.Tensor,
    lam: float,
    steps: int,
    lr: float,
) -> torch.Tensor:
    """Return, per module, the best ``dB`` seen by Adam (``dB = 0`` included) on :func:`fair_objective`.

    The same iteration as running :func:`fair_objective` and ``torch.optim.Adam`` module by module,
    vectorised over the leading module axis (shapes: ``m``, ``b_bar`` M x d_out x r; ``gram_a``
    M x r x r; ``norm_w`` (M,)); each module keeps its own best iterate.

    A step is four torch calls, each one pass over the module's d_out x r data. With
    ``C = B_bar gram_a`` (constant) the four rows ``z = [m, C, dB gram_a, dB]`` (flattened, stored
    together) give every reduction of a step as one batched matrix-vector product ``z dB``
    (``<B, m> = <B_bar, m> + <dB, m>`` and ``||B A_bar||^2 = <B_bar, C> + 2 <dB, C> + <dB, dB gram_a>``
    since ``gram_a`` is symmetric), and the gradient ``-(m - (<B, m> / q) B gram_a) / den + 2 lam dB``
    as one combination ``w z`` of the same rows. Adam is torch's fused kernel (the one behind
    ``torch.optim.Adam(fused=True)``: moments, bias corrections and the update in one pass), applied
    in place to the ``dB`` row, so a step allocates nothing of size d_out x r. The per-module scalars
    (cosine, loss, best iterate) are float64 Python arithmetic: a step's few dozen of them cost less
    so than as tensor ops.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    dtype = b_bar.dtype
    tiny = _TINY if dtype == torch.float64 else torch.finfo(dtype).tiny
    n_mod, d_out, r = b_bar.shape
    n = d_out * r
    c_mat = torch.bmm(b_bar, gram_a)  # C = B_bar gram_a
    z_rows = torch.zeros(n_mod, 4, n, dtype=dtype)  # per module the rows m, C, dB gram_a, dB
    z_rows[:, 0] = m.reshape(n_mod, n)
    z_rows[:, 1] = c_mat.reshape(n_mod, n)
    d_b, d_b_gram = z_rows[:, 3].view(n_mod, d_out, r), z_rows[:, 2].view(n_mod, d_out, r)
    d_b_col = z_rows[:, 3].unsqueeze(-1)  # M x n x 1
    # per-module scalars in float64: <B_bar, m>, <B_bar, C>, ||delta_W||^2
    c_inner, c_q = _vdot(b_bar, m).tolist(), _vdot(b_bar, c_mat).tolist()
    norm_sq = [x * x for x in norm_w.tolist()]
    grad = torch.empty(n_mod, 1, n, dtype=dtype)
    # Adam's tensors, one entry per module: dB (the z row, updated in place), gradient, moments
    params, grads = list(z_rows[:, 3]), list(grad.view(n_mod, n))
    moments = list(torch.zeros(n_mod, n, dtype=dtype))
    second_moments = list(torch.zeros(n_mod, n, dtype=dtype))
    step = torch.zeros((), dtype=torch.float32)  # the fused kernel reads t from a tensor, as torch.optim's
    best, best_loss = torch.zeros_like(b_bar), [math.inf] * n_mod
    best_views, d_b_views = list(best), list(d_b)  # per-module views, made once
    w = torch.zeros(n_mod, 1, 4, dtype=dtype)  # gradient = w z per module
    w_np = w.numpy()  # the same memory: per-step coefficients are written without tensor ops
    w_np[:, 0, 3] = 2.0 * lam
    for t in range(1, steps + 2):  # the last pass only evaluates the final iterate
        torch.bmm(d_b, gram_a, out=d_b_gram)
        # M x 4: <dB, m>, <dB, C>, <dB, dB gram_a>, <dB, dB>
        red = torch.bmm(z_rows, d_b_col).view(n_mod, 4).tolist()
        for i, (r_m, r_c, r_g, r_d) in enumerate(red):
            inner = c_inner[i] + r_m  # <B, m>
            q = max(c_q[i] + 2.0 * r_c + r_g, 0.0)  # ||B A_bar||^2
            den = math.sqrt(norm_sq[i] * q + tiny)
            loss = 1.0 - inner / den + lam * r_d
            if loss < best_loss[i]:
                best_loss[i] = loss
                best_views[i].copy_(d_b_views[i])
            # grad = -m / den + coef (C + dB gram_a) + 2 lam dB, coef = <B, m> / (q den), 0 if q = 0
            coef = inner / (q * den) if q > 0.0 else 0.0
            w_np[i, 0, :3] = (-1.0 / den, coef, coef)
        if t > steps:
            break
        torch.bmm(w, z_rows, out=grad)  # the gradient
        step.add_(1.0)
        torch._fused_adam_(
            params, grads, moments, second_moments, [], [step] * n_mod,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=0.0, eps=eps, amsgrad=False, maximize=False,
        )  # fmt: skip
    return best


def fair_batch(
    batch: ModuleBatch, weights: torch.Tensor, lam: float, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(A_bar, B_bar + dB)`` for a batch of same-shape modules (M x r x d_in, M x d_out x r).

    ``A_bar`` and ``B_bar`` are averaged in float64 exactly as FedIT does (so zero steps give
    FedIT's values); the correction runs in the batch's dtype. Modules whose ideal update is
    zero keep ``B_bar``. Modules are processed a few at a time (their ~10 working d_out x r
    tensors stay in cache), on parallel workers when the work is large
    (:func:`~strategies.batched.map_chunks`).
    """
    d_out, d_in, r = batch.prev_b.shape[-2], batch.prev_a.shape[-1], batch.rank
    kr = batch.a_cat.shape[-2]
    chunk = max(1, ADAM_CACHE_BYTES // (10 * d_out * r * batch.a_cat.element_size()))
    per_module = max(d_out, d_in) * kr * kr + steps * d_out * r * r  # Gram matrices + Adam steps
    workers = policy_threads(len(batch.modules) * per_module)
    pieces = map_chunks(
        lambda lo, hi: _fair_chunk(batch, lo, hi, weights, lam, steps, lr), len(batch.modules), chunk, workers
    )
    with thread_policy(0):  # copies: memory-bound, extra threads only contend
        return torch.cat([a for a, _ in pieces]), torch.cat([b for _, b in pieces])


def _fair_chunk(
    batch: ModuleBatch, lo: int, hi: int, weights: torch.Tensor, lam: float, steps: int, lr: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return :func:`fair_batch`'s ``(A_bar, B_bar + dB)`` for modules ``lo:hi`` of ``batch``."""
    dtype, r = batch.prev_a.dtype, batch.rank
    a_cat, bt_cat = batch.a_cat[lo:hi], batch.bt_cat[lo:hi]  # M x (K r) x d_in, M x (K r) x d_out
    b_cat = bt_cat.mT  # M x d_out x (K r); delta_W = B_cat diag(cw) A_cat, unweighted factors
    cw = torch.repeat_interleave(weights.to(dtype), torch.tensor(batch.ranks))  # (K r,)
    a_bar64 = fedit_mean([a_cat[:, i * r : (i + 1) * r] for i in range(len(batch.ranks))], weights)
    b_bar64 = fedit_mean([bt_cat[:, i * r : (i + 1) * r] for i in range(len(batch.ranks))], weights).mT
    a_bar, b_bar = a_bar64.to(dtype), b_bar64.to(dtype).contiguous()  # b_bar: M x d_out x r
    norm_w = weighted_gram_norm(b_cat, a_cat, cw)  # (M,)
    active = norm_w > 0.0
    if steps == 0 or math.isinf(lam) or not bool(active.any()):
        return a_bar64, b_bar64
    m = b_cat @ (cw[:, None] * (a_cat @ a_bar.mT))  # M x d_out x r
    gram_a = a_bar @ a_bar.mT  # M x r x r
    d_b = correct_batch(m, gram_a, norm_w, b_bar, lam, steps, lr)
    d_b[~active] = 0.0
    return a_bar64, b_bar + d_b


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
    f64 = torch.float64
    batch = ModuleBatch.from_clients(
        ("m",),
        [p.a.to(f64)[None] for p in pairs],
        [p.b.to(f64)[None] for p in pairs],
        pairs[0].a.to(f64)[None],
        pairs[0].b.to(f64)[None],
    )
    a, b = fair_batch(batch, weights, lam, steps, lr)
    return a[0], b[0]


def fair_aggregate(
    state: AdapterState, results: Sequence[ClientResult], lam: float, steps: int, lr: float
) -> AdapterState:
    """Return the next global state: FedIT averages with the corrected ``B`` per module."""
    p = example_weights(results)
    return aggregate_modules(state, results, lambda batch: fair_batch(batch, p, lam, steps, lr), p)


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
    dp_refusal = (
        "LoRA-FAIR fits a correction of B to the ideal update sum_k p_k B_k A_k of the clients' individual "
        "products; the noisy sum is not what gets released"
    )

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
