"""What one node brings to a run: its data, its LoRA rank, its device and its privacy budget.

In simulation Flower sets ``partition-id``/``num-partitions`` in each virtual node's
node-config; on a real SuperNode the operator passes ``--node-config`` with any of
:data:`NODE_KEYS`. Values from node-config win over the run config. The keys that
override a config field (``lora-rank``, ``device``, ``dp-epsilon``, ``data-path``,
``data-format``) are declared beside the field in :mod:`fedlora.config`
(:data:`~fedlora.config.NODE_FIELDS`) and validated like it; hyphens and underscores are
interchangeable.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from clients.floor import COLUMN_KEYS, FLOOR_KEYS, PrivacyFloor, node_data, privacy_floor
from fedlora.config import NODE_FIELDS, ConfigError, RunConfig, from_json, with_overrides
from fedlora.data.cached import partitions, stamp
from fedlora.data.partition import split_local
from fedlora.data.sources import FILLER_RECORD, Record, classification_records, instruction_records, read_rows
from fedlora.derive import derive_config
from fedlora.logs import configure_from_env

log = logging.getLogger(__name__)

# Ray actors and SuperNode app processes log at the driver's level (``fedlora simulate -v``).
configure_from_env()

# Node-config keys that are not config fields: where this node sits and keeps its state, its
# privacy floor and the columns of its own data file (clients.floor).
NODE_ONLY_KEYS = ("partition-id", "num-partitions", "state-dir", *FLOOR_KEYS, *COLUMN_KEYS)

NODE_KEYS = (*NODE_ONLY_KEYS, *NODE_FIELDS)


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
    floor: PrivacyFloor | None = None  # the node's own DP requirements (node-config dp-epsilon)
    columns: tuple[tuple[str, str], ...] = ()  # node-config column names of its own data file


def _normalised(node_config: Mapping[str, Any]) -> dict[str, Any]:
    return {str(k).strip().replace("_", "-"): v for k, v in node_config.items()}


def _get(node_config: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    if key not in node_config:
        return default
    value = node_config[key]
    try:
        return kind(value)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"invalid node-config {key} = {value!r}: expected {kind.__name__}") from err


def node_settings(cfg: RunConfig, node_config: Mapping[str, Any]) -> NodeSettings:
    """Resolve a node's settings; unknown node-config keys are ignored (Flower adds its own).

    Raises
    ------
    ConfigError
        Naming the node-config key, the value and what is allowed.
    """
    conf = _normalised(node_config)
    pid = _get(conf, "partition-id", 0, int)
    n_parts = _get(conf, "num-partitions", cfg.federation.num_clients, int)
    if not 0 <= pid < n_parts:
        raise ConfigError(
            f"node-config partition-id = {pid} is outside 0..{n_parts - 1} (num-partitions = {n_parts})"
        )
    given = {key: conf[key] for key in NODE_FIELDS if key in conf}
    if "lora-rank" not in given:
        given["lora-rank"] = cfg.rank_of(pid)
    if "data-path" in given and "data-format" not in given:
        given["data-format"] = "auto"  # the run's format describes the run's source, not this file
    try:
        local = with_overrides(cfg, {NODE_FIELDS[k]: v for k, v in given.items()})
    except ConfigError as err:
        for key, value in given.items():  # name the node-config key at fault
            try:
                with_overrides(cfg, {NODE_FIELDS[key]: value})
            except ConfigError as one:
                raise ConfigError(f"invalid node-config {key} = {value!r}: {one}") from err
        raise
    return NodeSettings(
        partition_id=pid,
        num_partitions=n_parts,
        data_path=local.data.source if "data-path" in conf else "",
        data_format=local.data.format if "data-path" in conf else "auto",
        rank=local.lora.rank,
        alpha=local.lora.alpha_for(local.lora.rank),
        device=local.train.device,
        dp_epsilon=local.privacy.epsilon,
        state_dir=_get(conf, "state-dir", "", str),
        floor=privacy_floor(conf),
        columns=tuple((k, str(conf[k])) for k in COLUMN_KEYS if k in conf),
    )


def local_config(run_config: str, node_config: Mapping[str, Any]) -> tuple[RunConfig, NodeSettings]:
    """Return the run config as this node applies it, and the node's settings.

    In this order: the node's privacy floor is checked against the server's config
    (:class:`clients.floor.PrivacyFloor`), the data settings become the node's own
    (:func:`clients.floor.node_data`: its file and columns, or the run's partition where that is
    allowed), and only then is anything derived from the data (``model.task`` or
    ``max_length`` the server left unset), so a server-named file is never opened.

    Raises
    ------
    clients.floor.FloorError
        When the server's config would weaken the floor or make the node read a file it names.
    """
    cfg = from_json(run_config)
    node = node_settings(cfg, node_config)
    if node.floor is not None:
        node.floor.check(cfg)  # at setup and every round: the server's config may change
    own = node_data(cfg.data, dict(node.columns), node.data_path, node.data_format)
    underived = cfg.model.task == "auto" or cfg.model.max_length <= 0
    if cfg.privacy.mode == "record" and node.data_path and underived:
        # Deriving them from the node's own file would read every record strictly (errors) and size the
        # work by its record lengths: both would tell the server about single records. (Without a
        # data-path the node partitions the run's own source, which the server derives from too.)
        raise ConfigError(
            "under record-level DP the run config must fix model.task and model.max_length (the server "
            "derives them before the first round); this node does not derive them from its records"
        )
    return derive_config(replace(cfg, data=own))[0], node  # a no-op on what the server derived


_DATA_CACHE: dict[tuple[Any, ...], tuple[list[Record], list[Record]]] = {}


def local_data(
    cfg: RunConfig, node: NodeSettings, labels: tuple[str, ...]
) -> tuple[list[Record], list[Record]]:
    """Return this node's (train, validation) records, cached per process.

    With ``data-path`` the node's own file is its whole training data, read with the node's own
    column names; otherwise the run's data source (the embedded task, or any source inside
    ``fedlora simulate``) is partitioned and the node takes partition ``partition-id``
    (:func:`clients.floor.node_data`).
    """
    key = (
        cfg.data,
        cfg.model.task,
        node.data_path,
        stamp(node.data_path),
        node.partition_id,
        node.num_partitions,
        node.data_format,
        node.columns,
        labels,
    )
    if key not in _DATA_CACHE:
        dcfg = node_data(cfg.data, dict(node.columns), node.data_path, node.data_format)
        if node.data_path:
            # Under record DP a bad row becomes a public filler record instead of an error: whether the
            # node errs must not tell the server (which picks the labels and max_length) about one record.
            dp = cfg.privacy.mode == "record"
            rows = read_rows(dcfg.source, dcfg.format, lenient=dp)
            if cfg.model.task == "classification":
                private = dp and bool(labels)
                records, _ = classification_records(rows, dcfg, dcfg.source, labels or None, filler=private)
                stand_ins = sum(r == FILLER_RECORD for r in records)
                if private and stand_ins:
                    log.warning(
                        "%d local record(s) replaced by a public filler (label or text invalid)", stand_ins
                    )
            else:
                records = instruction_records(rows, dcfg, dcfg.source, filler=dp)
        else:
            records = partitions(cfg.data, cfg.model.task, node.num_partitions)[node.partition_id]
        _DATA_CACHE[key] = split_local(
            records, cfg.data.local_val_fraction, cfg.data.seed + node.partition_id
        )
    return _DATA_CACHE[key]
