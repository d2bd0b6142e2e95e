"""Server-side privacy: client sampling, client-level DP on updates, ledgers and the report."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedlora.config import RunConfig
from strategies.base import ClientResult, Payload


class ServerPrivacy:
    """Privacy bookkeeping of one run on the server."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir

    def sample_clients(self, nodes: Sequence[int], k: int, rng: random.Random) -> list[int]:
        """Return the nodes that train this round (all, or a fixed-size sample of ``k``)."""
        if k == 0 or k >= len(nodes):
            return list(nodes)
        return sorted(rng.sample(list(nodes), k))

    def observe_reply(self, node: int, partition_id: int, reply: Message) -> None:
        """Record a client's privacy ledger from its reply."""

    def process_updates(self, results: list[ClientResult], payloads: Mapping[int, Payload], rnd: int) -> list[ClientResult]:
        """Apply client-level DP to the round's updates (identity without it)."""
        return results

    def round_summary(self, rnd: int) -> dict[str, Any]:
        """Privacy numbers for the round's metrics line."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state."""
        return {}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""

    def write_report(self) -> None:
        """Write the run's privacy report."""
