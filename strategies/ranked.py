"""Shared base of the methods whose clients train at different ranks (HetLoRA, FlexLoRA, FLoRA).

The global state holds every module at rank ``R = max(client ranks)`` and at one *global scale*
``s_g``: the scale ``alpha / r`` of the first client spec with rank ``R``, so the global state is
itself a valid PEFT adapter for that spec and ``delta_W = s_g * B_g @ A_g``. Client ``k`` (rank
``r_k``, scale ``s_k``) receives the first ``r_k`` rows of ``A_g`` and columns of ``B_g`` with
``s_g / s_k`` folded into ``B``, and its results are folded back by ``s_k / s_g``. With the
project default ``alpha = 2 r`` every scale is 2 and the folding is the identity.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from fedlora.adapters import AdapterState, LoraPair, join_state, split_state, state_rank
from strategies.base import ClientSpec, LoraStrategy, Payload
from strategies.common import StrategyError, clone_state, slice_rank


def client_view(state: Mapping[str, torch.Tensor], rank: int, fold: float) -> AdapterState:
    """Return ``state`` cut to ``rank`` with ``B`` multiplied by ``fold`` (= s_g / s_k).

    Non-LoRA tensors are copied unchanged. The result satisfies, per module,
    ``s_k * B_k @ A_k == s_g * B_g[:, :rank] @ A_g[:rank]``.
    """
    pairs, rest = split_state(state)
    out: dict[str, LoraPair] = {}
    for module, pair in pairs.items():
        a, b = slice_rank(pair.a, pair.b, rank)  # rank x d_in, d_out x rank
        out[module] = LoraPair(a=a, b=(b.to(torch.float64) * fold).to(b.dtype))
    return join_state(out, clone_state(rest))


def global_spec_scale(clients: Sequence[ClientSpec]) -> tuple[int, float]:
    """Return ``(R, s_g)``: the largest rank and the scale of the first client spec with it."""
    if not clients:
        raise StrategyError("need at least one client spec to fix the global rank and scale")
    rank = max(c.rank for c in clients)
    return rank, next(c.scale for c in clients if c.rank == rank)


class RankedStrategy(LoraStrategy):
    """Global state at rank ``R`` and scale ``s_g``; payloads are per-client rank slices."""

    def __init__(self) -> None:
        self._rank: int | None = None
        self._scale: float | None = None

    @property
    def global_scale(self) -> float:
        """The scale ``s_g`` of the global state (fixed by :meth:`init_state`)."""
        if self._scale is None:
            raise StrategyError(f"strategy {self.name!r}: call init_state or load_state_dict first")
        return self._scale

    @property
    def global_rank(self) -> int:
        """The rank ``R`` of the global state (fixed by :meth:`init_state`)."""
        if self._rank is None:
            raise StrategyError(f"strategy {self.name!r}: call init_state or load_state_dict first")
        return self._rank

    def init_state(self, template: AdapterState, clients: Sequence[ClientSpec]) -> AdapterState:
        """Fix ``R`` and ``s_g`` from ``clients`` and keep ``template`` (which must be at rank ``R``)."""
        rank, scale = global_spec_scale(clients)
        if state_rank(template) != rank:
            raise StrategyError(
                f"the initial adapter has rank {state_rank(template)} but the largest client rank is "
                f"{rank}; build the template at rank {rank}"
            )
        self._rank, self._scale = rank, scale
        return clone_state(template)

    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Send the first ``client.rank`` components with ``s_g / s_k`` folded into ``B``."""
        if client.rank > self.global_rank:
            raise StrategyError(
                f"client {client.node_id} has rank {client.rank}, above the global rank "
                f"{self.global_rank} fixed at the start of the run"
            )
        return Payload(adapter=client_view(state, client.rank, self.global_scale / client.scale))

    def state_dict(self) -> dict[str, Any]:
        """Return the global rank and scale."""
        return {"global_rank": self.global_rank, "global_scale": self.global_scale}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore the global rank and scale."""
        self._rank = int(data["global_rank"])
        self._scale = float(data["global_scale"])
