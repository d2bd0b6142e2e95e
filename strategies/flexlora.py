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
``U = Q_B U_c`` and ``V = Q_A V_c``.

The global state keeps the top ``R = max r_k`` components at the global scale ``s_g`` (see
:mod:`strategies.ranked`); truncating those to ``r_k`` equals truncating the full SVD. When the
update has fewer than ``R`` components (all ``B = 0``, or few clients), the missing ``A`` rows are
an orthonormal completion built from the previous global ``A`` with zero ``B`` columns, so the
product is exact, nothing is NaN, and every component can still learn.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fedlora.adapters import AdapterState, LoraPair, join_state, split_state
from strategies.base import ClientResult
from strategies.common import average_rest, example_weights, result_pairs, single_threaded
from strategies.ranked import RankedStrategy
from strategies.registry import register


def factored_svd(b_cat: torch.Tensor, a_cat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return the thin SVD ``(U, S, Vh)`` of ``b_cat @ a_cat`` without forming the product.

    Parameters
    ----------
    b_cat
        d_out x m.
    a_cat
        m x d_in.

    Returns
    -------
    U, S, Vh
        d_out x q, (q,), q x d_in with ``q = min(d_out, d_in, m)``, singular values descending.
    """
    q_b, r_b = torch.linalg.qr(b_cat.to(torch.float64))  # d_out x m', m' x m
    q_a, r_a = torch.linalg.qr(a_cat.to(torch.float64).T)  # d_in x m'', m'' x m
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # core m' x m''
    return q_b @ u_c, s, vh_c @ q_a.T


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


def flexlora_module(
    pairs: Sequence[LoraPair], coeffs: torch.Tensor, rank: int, global_scale: float, prev_a: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return global ``(A_g, B_g)`` (R x d_in, d_out x R, float64) for one module.

    ``s_g B_g A_g`` is the best rank-``rank`` approximation of ``sum_k coeffs[k] B_k A_k``
    (``coeffs[k] = p_k s_k``); ``A_g`` has orthonormal rows.
    """
    b_cat = torch.cat([c * p.b.to(torch.float64) for c, p in zip(coeffs, pairs, strict=True)], dim=1)
    a_cat = torch.cat([p.a.to(torch.float64) for p in pairs], dim=0)  # m x d_in
    u, s, vh = factored_svd(b_cat, a_cat)
    k = min(rank, s.shape[0])
    a_g = vh[:k]  # k x d_in
    b_g = u[:, :k] * (s[:k] / global_scale)  # d_out x k
    if k < rank:
        a_g = torch.cat([a_g, orthonormal_completion(a_g, prev_a.to(torch.float64), rank)])
        b_g = torch.cat([b_g, torch.zeros(b_g.shape[0], rank - k, dtype=torch.float64)], dim=1)
    return a_g, b_g


@single_threaded
def flexlora_aggregate(
    state: AdapterState, results: Sequence[ClientResult], global_scale: float
) -> AdapterState:
    """Return the next global state (rank and dtypes of ``state``)."""
    p = example_weights(results)
    coeffs = p * torch.tensor([r.spec.scale for r in results], dtype=torch.float64)  # p_k s_k
    client_pairs = result_pairs(results)
    global_pairs, _ = split_state(state)
    out: dict[str, LoraPair] = {}
    for module, g in global_pairs.items():
        a, b = flexlora_module([cp[module] for cp in client_pairs], coeffs, g.rank, global_scale, g.a)
        out[module] = LoraPair(a=a.to(g.a.dtype), b=b.to(g.b.dtype))
    new = join_state(out, average_rest([r.state for r in results], p, state))
    return {k: new[k] for k in state}


@register
class FlexLoRA(RankedStrategy):
    """Average full products, send each client its best rank-``r_k`` approximation."""

    name = "flexlora"

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """SVD-redistribute ``sum_k p_k s_k B_k A_k`` at the global rank and scale."""
        return flexlora_aggregate(state, results, self.global_scale)
