"""What one node brings to a run: its data, its LoRA rank, its device and its privacy budget.

In simulation Flower sets ``partition-id``/``num-partitions`` in each virtual node's
node-config; on a real SuperNode the operator passes ``--node-config`` with any of
:data:`NODE_KEYS`. Values from node-config win over the run config.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedlora.config import ConfigError, DataConfig, RunConfig
from fedlora.data.partition import partition_records, split_local
from fedlora.data.sources import (
    Record,
    classification_records,
    instruction_records,
    load_task_data,
    read_rows,
)

NODE_KEYS = (
    "partition-id",
    "num-partitions",
    "data-path",
    "data-format",
    "lora-rank",
    "device",
    "dp-epsilon",
    "state-dir",
)


@dataclass(frozen=True)
class NodeSettings:
    """Node-specific settings resolved from node-config and the run config."""

    partition_id: int
    num_partitions: int
    data_path: str
    data_format: str
    rank: int
    alpha: float
    device: str
    dp_epsilon: float
    state_dir: str


def _get(node_config: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    if key not in node_config:
        return default
    value = node_config[key]
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid node-config {key} = {value!r}: expected {kind.__name__}") from err


def node_settings(cfg: RunConfig, node_config: Mapping[str, Any]) -> NodeSettings:
    """Resolve a node's settings; unknown node-config keys are ignored (Flower adds its own)."""
    pid = _get(node_config, "partition-id", 0, int)
    n_parts = _get(node_config, "num-partitions", cfg.federation.num_clients, int)
    if not 0 <= pid < n_parts:
        raise ConfigError(
            f"node-config partition-id = {pid} is outside 0..{n_parts - 1} (num-partitions = {n_parts})"
        )
    rank = _get(node_config, "lora-rank", cfg.rank_of(pid), int)
    if rank < 1:
        raise ConfigError(f"node-config lora-rank = {rank}: expected an integer >= 1")
    device = _get(node_config, "device", cfg.train.device, str)
    eps = _get(node_config, "dp-epsilon", cfg.privacy.epsilon, float)
    return NodeSettings(
        partition_id=pid,
        num_partitions=n_parts,
        data_path=_get(node_config, "data-path", "", str),
        data_format=_get(node_config, "data-format", "auto", str),
        rank=rank,
        alpha=cfg.lora.alpha_for(rank),
        device=device,
        dp_epsilon=eps,
        state_dir=_get(node_config, "state-dir", "", str),
    )


_DATA_CACHE: dict[tuple[str, int, int, str, tuple[str, ...]], tuple[list[Record], list[Record]]] = {}


def local_data(
    cfg: RunConfig, node: NodeSettings, labels: tuple[str, ...]
) -> tuple[list[Record], list[Record]]:
    """Return this node's (train, validation) records, cached per process.

    With ``data-path`` the node's own file is its whole training data; otherwise the run's
    data source is partitioned and the node takes partition ``partition-id``.
    """
    key = (
        cfg.data.__repr__() + cfg.model.task + node.data_path,
        node.partition_id,
        node.num_partitions,
        node.data_format,
        labels,
    )
    if key not in _DATA_CACHE:
        if node.data_path:
            dcfg: DataConfig = replace(cfg.data, source=node.data_path, format=node.data_format)
            rows = read_rows(dcfg.source, dcfg.format)
            if cfg.model.task == "classification":
                records, _ = classification_records(rows, dcfg, dcfg.source, labels or None)
            else:
                records = instruction_records(rows, dcfg, dcfg.source)
        else:
            data = load_task_data(cfg.data, cfg.model.task)
            records = partition_records(data.train, node.num_partitions, cfg.data)[node.partition_id]
        _DATA_CACHE[key] = split_local(
            records, cfg.data.local_val_fraction, cfg.data.seed + node.partition_id
        )
    return _DATA_CACHE[key]
