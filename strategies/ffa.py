"""FFA-LoRA: federated LoRA with the A factors frozen.

Sun, Li, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024
(arXiv:2403.12313). ``A`` is random, non-zero and identical on every client (all derive it from
the run's shared seed, so the server never sends it); only ``B`` (zero-initialised) and the task
head are trained and averaged. Because ``A`` is shared, FedAvg of ``B`` is exact::

    sum_k p_k s B_k A = s (sum_k p_k B_k) A = s B_bar A

Clients check they hold the server's ``A`` by comparing :func:`a_fingerprint` of their adapter
with the ``a-fingerprint`` the payload carries.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.adapters import AdapterState, fingerprint, is_lora_a
from strategies.base import ClientResult, ClientSpec, LoraStrategy, Payload
from strategies.batched import thread_policy
from strategies.common import (
    StrategyError,
    a_tensors,
    average_named,
    clone_state,
    example_weights,
    require_uniform,
)
from strategies.registry import register

FINGERPRINT_KEY = "a-fingerprint"


def a_fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """Return the fingerprint of the ``A`` factors of ``state`` (other tensors are ignored)."""
    return fingerprint(a_tensors(state))


def ffa_aggregate(
    state: Mapping[str, torch.Tensor], states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor
) -> AdapterState:
    """Return the next global state: ``A`` kept from ``state``, every other tensor averaged.

    Parameters
    ----------
    state
        The global state; its ``A`` factors (r x d_in) are the frozen shared ones.
    states
        K client states holding every tensor of ``state`` except the ``A`` factors.
    weights
        Shape (K,), the aggregation weights ``p_k``.
    """
    frozen = a_tensors(state)
    if not frozen:
        raise StrategyError("FFA-LoRA needs LoRA A factors in the global state; found none")
    trained = [k for k in state if not is_lora_a(k)]
    out = {k: v.detach().clone() for k, v in frozen.items()}
    out.update(average_named(states, weights, trained, state))
    return {k: out[k] for k in state}  # keep the global state's name order


@register
class FFALoRA(LoraStrategy):
    """Frozen shared A, FedAvg of B and head (exact for the LoRA product)."""

    name = "ffa"
    dp_tensors = "no_lora_a"  # B and head averaged linearly; A frozen at its shared seed

    def init_state(self, template: AdapterState, clients: Sequence[ClientSpec]) -> AdapterState:
        """Keep ``template``: its seeded random ``A`` becomes the frozen shared factor.

        Raises
        ------
        StrategyError
            If ranks/scales differ (each client derives A at its own rank, so ranks must
            match), or an ``A`` factor is all zeros (then ``B`` would receive no gradient).
        """
        require_uniform(clients, self.name)
        zero = sorted(k for k, v in a_tensors(template).items() if not bool(v.any()))
        if zero:
            raise StrategyError(f"FFA-LoRA needs a random non-zero frozen A, but {zero[0]!r} is all zeros")
        return clone_state(template)

    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Send ``B`` and the head; ``A`` stays frozen on the client and is checked by fingerprint."""
        adapter = {k: v.detach().clone() for k, v in state.items() if not is_lora_a(k)}
        return Payload(adapter=adapter, train_a=False, extras={FINGERPRINT_KEY: a_fingerprint(state)})

    def final_adapter(self, state: AdapterState, client: ClientSpec) -> AdapterState:
        """Return the full adapter (frozen ``A`` included) for export and evaluation."""
        return clone_state(state)

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Average ``B`` and the head with example-count weights; keep ``A``."""
        require_uniform([r.spec for r in results], self.name)
        with thread_policy(0):  # weighted sums: memory-bound, extra threads only contend
            return ffa_aggregate(state, [r.state for r in results], example_weights(results))
