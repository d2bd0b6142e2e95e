"""The message protocol between the ServerApp and ClientApps (the only Flower-aware tensor code).

Message types and their content (record names in quotes):

``query`` (server -> client, once per run)
    "config": ConfigRecord ``{"run-config": <RunConfig JSON>}``.
    Reply "info": ConfigRecord ``{"rank", "alpha", "num-examples", "partition-id"}``.
``train`` (server -> client, every round)
    "adapter": ArrayRecord, tensors the client starts from (PEFT names, see
    :mod:`fedlora.adapters`); "merge": ArrayRecord, optional factored base update (FLoRA);
    "config": ConfigRecord ``{"run-config", "round", "rank", "alpha", "train-a",
    "fresh-adapter", "seed", ...strategy extras}``.
    Reply "update": ArrayRecord of *deltas* (trained minus received) of the tensors the
    client trains; "metrics": MetricRecord (``num-examples``, ``train-loss``, ...);
    "privacy": ConfigRecord with the client's privacy ledger as JSON (may be absent).

Only adapter tensors ever travel; base weights never do.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord

from fedlora.adapters import AdapterState

QUERY = "query"
TRAIN = "train"


def to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Pack an adapter state (float32, CPU) into an ArrayRecord, keeping PEFT names."""
    return ArrayRecord({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})


def from_record(record: ArrayRecord) -> AdapterState:
    """Unpack an ArrayRecord into an adapter state (tensor copies the caller may modify)."""
    return {k: v.clone() for k, v in record.to_torch_state_dict().items()}


def record_bytes(record: ArrayRecord | None) -> int:
    """Return the serialised size of ``record`` in bytes (0 for None)."""
    return 0 if record is None else int(record.count_bytes())
