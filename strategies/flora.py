"""FLoRA: stack the clients' LoRA factors, merge the exact average into the base, restart LoRA.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with
Heterogeneous Low-Rank Adaptations", NeurIPS 2024 (arXiv:2409.05976). Per module and round the
server stacks

    B_stack = [B_1 ... B_K]                          # d_out x sum r_k
    A_stack = [p_1 s_1 A_1; ...; p_K s_K A_K]        # sum r_k x d_in

so ``B_stack @ A_stack == sum_k p_k s_k B_k A_k`` exactly, for any mix of ranks. Every client adds
that product to its frozen base weight and starts a fresh LoRA from the shared seed next round.

Here the server keeps the *cumulative* merge (all rounds' stacks concatenated along the rank
dimension, scale folded into ``A``) and sends it every round with its fingerprint, so a client
rebuilds its base from the pristine weights plus ``merge_B @ merge_A``; clients need no memory
across rounds. When a module's cumulative rank exceeds ``min(d_out, d_in)``, it is re-factored
losslessly by a factored SVD (``B = U``, ``A = diag(S) V^T``), which bounds the payload. The task
head (non-LoRA tensors) is FedAvg'd and kept in the global state next to the fresh template.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.adapters import AdapterState, LoraPair, a_name, b_name, fingerprint, join_state, split_state
from strategies.base import ClientResult, ClientSpec, Payload
from strategies.batched import thread_policy
from strategies.common import (
    average_rest,
    clone_state,
    example_weights,
    result_pairs,
)
from strategies.flexlora import factored_svd
from strategies.ranked import RankedStrategy
from strategies.registry import register

FINGERPRINT_KEY = "base-fingerprint"


def flora_module(
    pairs: Sequence[LoraPair], coeffs: torch.Tensor, dtype: torch.dtype = torch.float64
) -> LoraPair:
    """Return the stacked factors of one module in ``dtype`` (``coeffs[k] = p_k s_k``).

    ``A``: (sum r_k) x d_in with ``coeffs[k]`` folded into client k's rows; ``B``: d_out x (sum r_k).
    Each client's rows are scaled straight into the stack (one pass over the factors, no
    temporaries): at Llama-7B shape the stacks are the whole merge, 5 MiB per module at rank 160.
    """
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32  # scale half types in float32
    rows = sum(p.a.shape[0] for p in pairs)
    a = torch.empty(rows, pairs[0].a.shape[1], dtype=work)
    start = 0
    for c, p in zip(coeffs, pairs, strict=True):
        torch.mul(p.a.to(work), float(c), out=a[start : start + p.a.shape[0]])
        start += p.a.shape[0]
    b = torch.cat([p.b.to(dtype) for p in pairs], dim=1)
    return LoraPair(a=a.to(dtype), b=b)


def compact(pair: LoraPair) -> LoraPair:
    """Re-factor ``B @ A`` at rank ``min(d_out, d_in)`` when the stack is wider (same product)."""
    d_out, d_in = pair.b.shape[0], pair.a.shape[1]
    if pair.rank <= min(d_out, d_in):
        return pair
    # float64: the re-factoring must stay lossless (it is rare, so precision costs nothing)
    u, s, vh = factored_svd(pair.b.double(), pair.a.double())  # d_out x q, (q,), q x d_in
    return LoraPair(a=(s[:, None] * vh).to(pair.a.dtype), b=u.to(pair.b.dtype))


def extend_merge(
    merge: Mapping[str, torch.Tensor], new: Mapping[str, LoraPair], like: AdapterState
) -> AdapterState:
    """Return ``merge`` with the ``new`` stacks appended along the rank dimension (dtypes of ``like``).

    ``merge`` may be empty (first round); it is not modified.
    """
    out: dict[str, LoraPair] = {}
    for module, pair in new.items():
        a, b = pair.a.to(like[a_name(module)].dtype), pair.b.to(like[b_name(module)].dtype)
        if a_name(module) in merge:
            a = torch.cat([merge[a_name(module)], a], dim=0)  # (R_old + R_new) x d_in
            b = torch.cat([merge[b_name(module)], b], dim=1)  # d_out x (R_old + R_new)
        out[module] = compact(LoraPair(a=a, b=b))
    return join_state(out)


def flora_round(
    results: Sequence[ClientResult], modules: Sequence[str], like: AdapterState
) -> dict[str, LoraPair]:
    """Return this round's stacked factors per module (example-count weights, clients' scales).

    Each stack is built in the dtype of ``like``'s A factor (the merge's dtype), so float32
    adapters never pass through float64 copies.
    """
    p = example_weights(results)
    coeffs = p * torch.tensor([r.spec.scale for r in results], dtype=torch.float64)  # p_k s_k
    client_pairs = result_pairs(results)
    return {m: flora_module([cp[m] for cp in client_pairs], coeffs, like[a_name(m)].dtype) for m in modules}


@register
class FLoRA(RankedStrategy):
    """Exact stacking aggregation; cumulative merge into the base; fresh LoRA every round."""

    name = "flora"
    dp_refusal = (
        "FLoRA stacks every client's factors side by side, so each client's update is released "
        "individually, not inside a noisy sum"
    )

    def __init__(self) -> None:
        super().__init__()
        self._merge: AdapterState = {}
        self._rounds = 0

    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Send the fresh template at the client's rank, the cumulative merge and its fingerprint."""
        adapter = super().payload(state, client).adapter
        merge = self.final_merge(state)
        return Payload(
            adapter=adapter,
            merge=merge,
            extras={FINGERPRINT_KEY: fingerprint(merge or {})},
        )

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Append this round's stack to the merge; keep the template; FedAvg the head."""
        global_pairs, _ = split_state(state)
        with thread_policy(0):  # concatenation, scaling and copies: memory-bound, no matrix products
            stacks = flora_round(results, list(global_pairs), state)
            self._merge = extend_merge(self._merge, stacks, state)
            new = {k: v.detach().clone() for k, v in state.items()}
            new.update(average_rest([r.state for r in results], example_weights(results), state))
        self._rounds += 1
        return new

    def final_merge(self, state: AdapterState) -> AdapterState | None:
        """Return the cumulative merge (None before the first aggregation)."""
        return clone_state(self._merge) if self._merge else None

    def state_dict(self) -> dict[str, Any]:
        """Return the global rank/scale, the cumulative merge (tensors) and the round count."""
        return {**super().state_dict(), "merge": clone_state(self._merge), "rounds": self._rounds}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        super().load_state_dict(data)
        self._merge = clone_state(data["merge"])
        self._rounds = int(data["rounds"])
