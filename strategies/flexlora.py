"""FlexLoRA: aggregate the full-rank products, redistribute by truncated SVD.

Bai, Chen, Qian, Yao, Li, "Federated Fine-tuning of Large Language Models under Heterogeneous
Tasks and Client Resources", NeurIPS 2024 (arXiv:2402.11505). Per module the server forms

    delta_W = sum_k p_k s_k B_k A_k                       # d_out x d_in

and its SVD ``U diag(S) V^T``; client ``k`` receives the best rank-``r_k`` factors
(Eckart-Young) ``B = U_r diag(S_r) / s_k`` and ``A = V_r^T``.

The SVD is computed in factored form and never forms ``delta_W``: with
``B_cat = [p_1 s_1 B_1 ... p_K s_K B_K]`` (d_out x m, m = sum r_k) and
``A_cat = [A_1; ...; A_K]`` (m x d_in), ``delta_W = B_cat A_cat = Q_B (R_B R_A^T) Q_A^T`` from the
QR factorisations of ``B_cat`` and ``A_cat^T``; the SVD of the small m x m core gives
``U = Q_B U_c`` and ``V = Q_A V_c``. The QRs stay in Householder form (LAPACK ``geqrf``) and only
the ``R`` wanted columns of ``U``, ``V`` are formed (``ormqr``), which is ~2.5x fewer FLOPs than
forming ``Q`` explicitly; modules sharing a shape are factored in one batched call
(:mod:`strategies.batched`), in float32 for float32 adapters (float64 inputs stay float64).

The global state keeps the top ``R = max r_k`` components at the global scale ``s_g`` (see
:mod:`strategies.ranked`); truncating those to ``r_k`` equals truncating the full SVD. When the
update has fewer than ``R`` components (all ``B = 0``, or few clients), the missing ``A`` rows are
an orthonormal completion built from the previous global ``A`` with zero ``B`` columns, so the
product is exact, nothing is NaN, and every component can still learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters import AdapterState, LoraPair
from strategies.base import ClientResult
from strategies.batched import (
    ModuleBatch,
    aggregate_modules,
    compute_dtype,
    map_chunks,
    policy_threads,
    thread_policy,
)
from strategies.common import example_weights
from strategies.ranked import RankedStrategy
from strategies.registry import register

# Use the Gram-matrix SVD (gram_top_svd) when the stacked rank m is at most min(d_out, d_in) / 2:
# it then costs no more multiply-adds than the Householder QRs and runs them as BLAS-3 products.
GRAM_RATIO = 2


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """Return ``x`` (... x n x k) with zero rows appended up to ``rows``."""
    if x.shape[-2] == rows:
        return x.contiguous()
    out = x.new_zeros(*x.shape[:-2], rows, x.shape[-1])
    out[..., : x.shape[-2], :] = x
    return out


def factored_svd(
    b_cat: torch.Tensor, a_cat: torch.Tensor, top: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the thin SVD ``(U, S, Vh)`` of ``b_cat @ a_cat`` without forming the product.

    Parameters
    ----------
    b_cat
        (...) x d_out x m; leading dimensions are a batch.
    a_cat
        (...) x m x d_in.
    top
        Form only the leading ``top`` singular triplets (default: all ``q``).

    Returns
    -------
    U, S, Vh
        (...) x d_out x k, (...) x k, (...) x k x d_in with ``k = min(top, q)``,
        ``q = min(d_out, d_in, m)``, singular values descending; computed in
        :func:`~strategies.batched.compute_dtype` of the inputs.
    """
    dtype = compute_dtype(b_cat, a_cat)
    b, a_t = b_cat.to(dtype), a_cat.to(dtype).mT  # ... x d_out x m, ... x d_in x m
    d_out, m, d_in = b.shape[-2], b.shape[-1], a_t.shape[-2]
    h_b, tau_b = torch.geqrf(b)  # Householder form of Q_B, R_B in the upper triangle
    h_a, tau_a = torch.geqrf(a_t)
    r_b = h_b[..., : min(d_out, m), :].triu()  # q_b x m
    r_a = h_a[..., : min(d_in, m), :].triu()  # q_a x m
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)  # core q_b x q_a
    k = s.shape[-1] if top is None else min(top, s.shape[-1])
    u = torch.ormqr(h_b, tau_b, _pad_rows(u_c[..., :k], d_out))  # Q_B [U_c; 0]: d_out x k
    v = torch.ormqr(h_a, tau_a, _pad_rows(vh_c[..., :k, :].mT, d_in))  # d_in x k
    return u, s[..., :k], v.mT


def gram_factor(gram: torch.Tensor) -> torch.Tensor:
    """Return ``L`` with ``L @ L.mT == gram`` for symmetric positive semi-definite ``gram`` (... x m x m).

    Cholesky where it succeeds (positive definite to working precision); where it fails
    (rank-deficient factors, e.g. clients that share their ``A``, or a rounding-negative
    eigenvalue) the eigen-decomposition ``V diag(sqrt(max(lambda, 0)))`` of that matrix, which
    exists for every semi-definite matrix. Neither is ever inverted.
    """
    chol, info = torch.linalg.cholesky_ex(gram)
    bad = info != 0
    if bool(bad.any()):
        vals, vecs = torch.linalg.eigh(gram[bad])
        chol[bad] = vecs * vals.clamp_min(0.0).sqrt().unsqueeze(-2)
    return chol


def gram(x: torch.Tensor) -> torch.Tensor:
    """Return ``x^T x`` (... x m x m) in float64 for ``x`` (... x d x m), in range for any finite ``x``.

    The product runs in ``x``'s dtype (BLAS-3 speed). Where it overflows (float32 entries beyond
    ~1e19, e.g. a hostile update with the server's caps turned off) it is redone on ``x`` divided
    by its largest magnitude per matrix and scaled back in float64, so the result is never ``inf``
    for finite input.
    """
    g = x.mT @ x
    if bool(torch.isfinite(g).all()):
        return g.double()
    top = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
    y = x / top
    return (y.mT @ y).double() * top.double().square()


def gram_top_svd(
    b_cat: torch.Tensor, a_cat: torch.Tensor, top: int, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the leading ``top`` singular triplets of ``b_cat @ diag(scale) @ a_cat`` from Gram matrices.

    For tall factors (``m`` much smaller than ``d_out``, ``d_in``) the two Gram matrices
    ``G_B = B^T B`` and ``G_A = A A^T`` (m x m) are matrix products, which run at BLAS-3 speed
    (measured ~5x faster than Householder QR of the same d x m factor on this project's CPU),
    and everything after them is small or d x top:

    1. ``G_A = L L^T`` (:func:`gram_factor`). The non-zero squared singular values of
       ``delta_W = B A`` are the eigenvalues of ``T = L^T G_B L`` (m x m, float64), and with
       ``T w_i = sigma_i^2 w_i`` the left singular vectors are ``u_i = B L w_i / sigma_i``.
    2. ``U_q``: orthonormal basis (QR) of ``B L W_top`` (d_out x top); no ``sigma`` is inverted.
    3. Rayleigh-Ritz: the SVD of ``Z = delta_W^T U_q = A^T (B^T U_q)`` (d_in x top, factored)
       gives ``U_q U_q^T delta_W = (U_q Y) diag(S) V^T``, the exact SVD of the projection onto
       that subspace, so ``U`` and ``V`` are orthonormal to working precision however small the
       trailing singular values are.

    The Gram matrices square the condition number, so singular values far below the largest
    (``sigma_i / sigma_1`` near ``sqrt(eps)``) are less accurate than with :func:`factored_svd`;
    the leading ``top`` of an update are not (errors against the dense SVD are in
    ``docs/benchmarks.md``).

    Parameters
    ----------
    b_cat
        (...) x d_out x m; leading dimensions are a batch.
    a_cat
        (...) x m x d_in.
    top
        Number of triplets; ``k = min(top, m, d_out, d_in)`` are returned.
    scale
        Shape (m,), weights of ``b_cat``'s columns (default ones); applied to the m x m and
        m x k intermediates, so ``b_cat`` is never copied to scale it.

    Returns
    -------
    U, S, Vh
        (...) x d_out x k, (...) x k (descending), (...) x k x d_in, in
        :func:`~strategies.batched.compute_dtype` of the inputs.
    """
    dtype = compute_dtype(b_cat, a_cat)
    b, a = b_cat.to(dtype), a_cat.to(dtype)
    d_out, m, d_in = b.shape[-2], b.shape[-1], a.shape[-1]
    k = min(top, m, d_out, d_in)
    c = torch.ones(m, dtype=torch.float64) if scale is None else scale.to(torch.float64)
    g_b = gram(b) * (c[:, None] * c[None, :])  # m x m, (B D)^T (B D)
    l_a = gram_factor(gram(a.mT))  # m x m, L L^T = G_A
    _, w = torch.linalg.eigh(l_a.mT @ g_b @ l_a)  # ascending eigenvalues sigma_i^2
    u_q, _ = torch.linalg.qr(b @ (c[:, None] * (l_a @ w[..., -k:].flip(-1))).to(dtype))  # d_out x k
    z = a.mT @ (c.to(dtype)[:, None] * (b.mT @ u_q))  # d_in x k: (B D A)^T U_q
    v, s, yh = torch.linalg.svd(z, full_matrices=False)  # Z = V diag(S) Y^T
    return u_q @ yh.mT, s, v.mT


def orthonormal_completion(rows: torch.Tensor, hint: torch.Tensor, total: int) -> torch.Tensor:
    """Return ``total - len(rows)`` unit rows orthogonal to ``rows`` and to each other.

    Parameters
    ----------
    rows
        k x d, orthonormal rows to complete.
    hint
        n x d, preferred directions (orthogonalised against ``rows`` in order).
    total
        Wanted row count after completion; rows beyond ``d`` are zero.
    """
    k, d = rows.shape
    basis = torch.cat([rows, hint.to(rows.dtype), torch.eye(d, dtype=rows.dtype)]).T  # d x (k + n + d)
    q, _ = torch.linalg.qr(basis)  # d x d, Householder: orthonormal even for dependent columns
    extra = q[:, k:total].T  # (min(total, d) - k) x d
    pad = torch.zeros(max(0, total - max(d, k)), d, dtype=rows.dtype)
    return torch.cat([extra, pad])


def flexlora_batch(
    batch: ModuleBatch, coeffs: torch.Tensor, global_scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return global ``(A_g, B_g)`` (M x R x d_in, M x d_out x R) for a batch of same-shape modules.

    Per module, ``s_g B_g A_g`` is the best rank-``R`` approximation of ``sum_k coeffs[k] B_k A_k``
    (``coeffs[k] = p_k s_k``) and ``A_g`` has orthonormal rows.
    """
    rank = batch.rank
    b_cat, a_cat = batch.b_cat, batch.a_cat  # M x d_out x m, M x m x d_in
    scale = torch.repeat_interleave(coeffs.to(torch.float64), torch.tensor(batch.ranks))  # (m,)
    d_small, m = min(b_cat.shape[-2], a_cat.shape[-1]), b_cat.shape[-1]
    d = max(b_cat.shape[-2], a_cat.shape[-1])
    if GRAM_RATIO * m <= d_small:
        # Gram products dominate (~2 d m^2 multiply-adds per module): modules on parallel workers
        workers = policy_threads(len(batch.modules) * d * m * m)
        parts = map_chunks(
            lambda lo, hi: gram_top_svd(b_cat[lo:hi], a_cat[lo:hi], rank, scale),
            len(batch.modules),
            -(-len(batch.modules) // workers),
            workers,
        )
        u, s, vh = (torch.cat(x) for x in zip(*parts, strict=True))
    else:
        with thread_policy(d * m * m):  # the QRs dominate: ~d m^2 multiply-adds per module
            u, s, vh = factored_svd(b_cat * scale.to(b_cat.dtype), a_cat, top=rank)
    k = s.shape[-1]
    with thread_policy(0):  # elementwise and small: extra threads only contend
        a_g = vh  # M x k x d_in
        b_g = u * (s / global_scale).unsqueeze(-2)  # M x d_out x k
        if k < rank:
            a_g = torch.stack(
                [
                    torch.cat([a, orthonormal_completion(a, p, rank)])
                    for a, p in zip(a_g, batch.prev_a, strict=True)
                ]
            )
            b_g = torch.cat([b_g, b_g.new_zeros(*b_g.shape[:-1], rank - k)], dim=-1)
    return a_g, b_g


def flexlora_module(
    pairs: Sequence[LoraPair], coeffs: torch.Tensor, rank: int, global_scale: float, prev_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return global ``(A_g, B_g)`` (R x d_in, d_out x R, float64) of one module (:func:`flexlora_batch`)."""
    f64 = torch.float64
    batch = ModuleBatch.from_clients(
        ("m",),
        [p.a.to(f64)[None] for p in pairs],
        [p.b.to(f64)[None] for p in pairs],
        prev_a.to(f64)[None],
        torch.zeros(1, pairs[0].b.shape[0], rank, dtype=f64),
    )
    a, b = flexlora_batch(batch, coeffs, global_scale)
    return a[0], b[0]


def flexlora_aggregate(
    state: AdapterState, results: Sequence[ClientResult], global_scale: float
) -> AdapterState:
    """Return the next global state (rank and dtypes of ``state``)."""
    p = example_weights(results)
    coeffs = p * torch.tensor([r.spec.scale for r in results], dtype=torch.float64)  # p_k s_k
    return aggregate_modules(state, results, lambda batch: flexlora_batch(batch, coeffs, global_scale), p)


@register
class FlexLoRA(RankedStrategy):
    """Average full products, send each client its best rank-``r_k`` approximation."""

    name = "flexlora"
    dp_refusal = (
        "FlexLoRA forms each client's product B_k A_k and re-factorises the weighted sum by SVD; clipping "
        "the factors does not bound the product's sensitivity"
    )

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """SVD-redistribute ``sum_k p_k s_k B_k A_k`` at the global rank and scale."""
        return flexlora_aggregate(state, results, self.global_scale)
