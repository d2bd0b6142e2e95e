"""FedIT: plain FedAvg of the LoRA factors.

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning",
ICASSP 2024 (arXiv:2305.05644). Every client trains LoRA at one rank r and scale s; the server
averages each factor separately::

    A_bar = sum_k p_k A_k          # r x d_in
    B_bar = sum_k p_k B_k          # d_out x r

and every other tensor (task head) likewise. Note ``B_bar @ A_bar != sum_k p_k B_k @ A_k`` in
general: the cross terms are the aggregation error that ``fair`` corrects and ``ffa``/``flora``
avoid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedlora.adapters import AdapterState
from strategies.base import ClientResult, ClientSpec, LoraStrategy, Payload
from strategies.batched import thread_policy
from strategies.common import average_named, clone_state, example_weights, require_uniform
from strategies.registry import register


def fedit_aggregate(
    states: Sequence[Mapping[str, torch.Tensor]], weights: torch.Tensor, like: Mapping[str, torch.Tensor]
) -> AdapterState:
    """Return the weighted average of every tensor of ``like`` over ``states``.

    Parameters
    ----------
    states
        K client states with the same names and shapes as ``like``.
    weights
        Shape (K,), the aggregation weights ``p_k`` (summing to one).
    like
        The current global state: fixes the names, order and output dtypes.
    """
    return average_named(states, weights, list(like), like)


@register
class FedIT(LoraStrategy):
    """FedAvg of A and B separately; every client at one rank and scale."""

    name = "fedit"
    dp_tensors = "all"  # A, B and head averaged coordinate-wise: linear in the updates

    def init_state(self, template: AdapterState, clients: Sequence[ClientSpec]) -> AdapterState:
        """Check all clients share one rank/scale and keep ``template`` as the global state."""
        require_uniform(clients, self.name)
        return clone_state(template)

    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Send the global adapter unchanged."""
        return Payload(adapter=clone_state(state))

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Average every tensor with example-count weights."""
        require_uniform([r.spec for r in results], self.name)
        with thread_policy(0):  # weighted sums: memory-bound, extra threads only contend
            return fedit_aggregate([r.state for r in results], example_weights(results), state)
