"""What every aggregation method provides: the contract between the server loop and the math.

A method is a :class:`LoraStrategy`. The server loop (``server/``) owns Flower messaging,
validation, checkpoints and metrics; a strategy owns only adapter tensors:

1. :meth:`LoraStrategy.init_state` turns a freshly initialised adapter (built with the
   run's shared seed at the server's rank) into the method's global state.
2. :meth:`LoraStrategy.payload` says what one client starts its round from (its own rank
   view of the global state, an optional factored update to fold into its base, which
   tensors it trains).
3. :meth:`LoraStrategy.aggregate` turns validated client results into the next global state.

Tensors are named by the contract in :mod:`fedlora.adapters`. Strategies never mutate
their inputs and never see Flower objects, so every method is testable on small tensors.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedlora.adapters import AdapterState


@dataclass(frozen=True)
class ClientSpec:
    """One client's LoRA shape: its rank ``r`` and ``alpha`` (its scale is ``alpha / r``)."""

    node_id: int
    rank: int
    alpha: float

    @property
    def scale(self) -> float:
        """The LoRA scaling ``s = alpha / r``."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class ClientResult:
    """A client's trained adapter as the server rebuilt it (received tensors + the client's delta).

    ``state`` holds every tensor of the client's payload with the client's trained values,
    so product-based methods see full ``A_k`` and ``B_k``.
    """

    spec: ClientSpec
    num_examples: int
    state: AdapterState


@dataclass(frozen=True)
class Payload:
    """What one client receives at the start of a round.

    Attributes
    ----------
    adapter
        Tensors the client loads into its adapter before training. Tensors the client
        derives itself from the shared seed (FFA-LoRA's frozen A) may be left out.
    merge
        A factored update (PEFT names, any rank, scale already folded into A) that the
        client adds to its frozen base weights before training (FLoRA), or None.
    train_a
        Whether the client trains the A factors (False for FFA-LoRA).
    extras
        Small scalars/strings sent in the round config (fingerprints, seeds).
    """

    adapter: AdapterState
    merge: AdapterState | None = None
    train_a: bool = True
    extras: Mapping[str, int | float | str] = field(default_factory=dict)


class LoraStrategy(ABC):
    """Base class of every aggregation method (see module docstring)."""

    name: ClassVar[str]
    dp_tensors: ClassVar[str | None] = None
    """Which tensors client-level DP-FedAvg may clip and noise (``server.privacy.ClientLevelDP``):
    ``"all"``, ``"no_lora_a"`` (A frozen and shared), or None when the method's release is not a
    linear average of the clients' factor updates (client-level DP is then refused)."""
    dp_refusal: ClassVar[str] = (
        "it does not declare which of its tensors a noisy sum of clipped updates may privatise "
        "(LoraStrategy.dp_tensors)"
    )
    """Why client-level DP is refused when ``dp_tensors`` is None (shown to the user)."""

    def init_state(self, template: AdapterState, clients: Sequence[ClientSpec]) -> AdapterState:
        """Return the initial global state from a freshly initialised adapter ``template``.

        ``template`` is built at rank ``max(client ranks)`` with the run's shared seed.
        The default keeps it as it is.
        """
        return {k: v.clone() for k, v in template.items()}

    @abstractmethod
    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Return what ``client`` starts its round from, given the global ``state``."""

    @abstractmethod
    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Return the next global state from validated ``results`` (never empty)."""

    def final_adapter(self, state: AdapterState, client: ClientSpec) -> AdapterState:
        """Return the adapter to export/evaluate for ``client`` (default: its payload adapter)."""
        return dict(self.payload(state, client).adapter)

    def final_merge(self, state: AdapterState) -> AdapterState | None:
        """Return the factored update folded into the base for evaluation (FLoRA), else None."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """Return strategy state that must survive a restart (besides the global tensors)."""
        return {}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:  # noqa: B027 (optional hook)
        """Restore what :meth:`state_dict` returned."""


class StrategyWrapper(LoraStrategy):
    """A strategy that changes how another one aggregates and delegates everything else.

    Defences and server-side DP compose around a method this way (as Flower wraps its
    strategies with DP) instead of adding flags to it; subclasses override what they change.
    """

    def __init__(self, inner: LoraStrategy) -> None:
        self.inner = inner
        self.name = inner.name  # type: ignore[misc]
        self.dp_tensors = inner.dp_tensors  # type: ignore[misc]
        self.dp_refusal = inner.dp_refusal  # type: ignore[misc]

    def init_state(self, template: AdapterState, clients: Sequence[ClientSpec]) -> AdapterState:
        """Delegate to the wrapped method."""
        return self.inner.init_state(template, clients)

    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Delegate to the wrapped method."""
        return self.inner.payload(state, client)

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Delegate to the wrapped method."""
        return self.inner.aggregate(state, results)

    def final_adapter(self, state: AdapterState, client: ClientSpec) -> AdapterState:
        """Delegate to the wrapped method."""
        return self.inner.final_adapter(state, client)

    def final_merge(self, state: AdapterState) -> AdapterState | None:
        """Delegate to the wrapped method."""
        return self.inner.final_merge(state)

    def state_dict(self) -> dict[str, Any]:
        """Delegate to the wrapped method."""
        return self.inner.state_dict()

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Delegate to the wrapped method."""
        self.inner.load_state_dict(data)


def normalised_weights(counts: Sequence[float]) -> torch.Tensor:
    """Return ``p_k = n_k / sum(n)`` as float64.

    Raises
    ------
    ValueError
        If a weight is negative or not finite, or all are zero.
    """
    w = torch.tensor([float(c) for c in counts], dtype=torch.float64)
    if len(w) == 0 or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"aggregation weights must be finite, non-negative and not all zero; got {list(counts)}"
        )
    return w / w.sum()
