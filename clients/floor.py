"""What a node decides for itself, whatever the server's run config says.

Record-level DP protects a node's records against the server (docs/privacy.md), so the server
must not be able to weaken it, and a node must not read files or columns the server names.
Before this module a node took both from the run config the server sent: ``privacy.mode =
"none"`` made a node started with ``dp-epsilon = 4`` train without noise, ``data.source``
made a node without ``data-path`` read any file, and ``data.label_column = "text"`` made a
node quote a private record in its error reply.

* **Privacy floor.** A node whose node-config sets ``dp-epsilon`` (its DP target) refuses
  every request that would weaken it: a mode other than ``"record"``, a δ above its own
  (node-config ``dp-delta``, default :data:`DEFAULT_NODE_DELTA`), a DP-SGD clipping norm above
  its own (node-config ``dp-max-grad-norm``, when set; σ is relative to the clip, so ε does not
  depend on it, but the node may pin it). Its ε target is its own already (``dp-epsilon``
  overrides the run's). δ is capped for every run by :data:`fedlora.config.MAX_DELTA`.
* **Data.** A node reads its own ``data-path`` with its own column names (node-config
  ``text-column``, ``label-column``, ``instruction-column``, ``response-column``, else the
  defaults), never the run's. Without ``data-path`` it partitions the run's source only when
  that is the embedded task, or inside ``fedlora simulate`` (where the operator runs both
  sides).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from fedlora.config import ConfigError, DataConfig, RunConfig

DEFAULT_NODE_DELTA = 1e-5
COLUMN_KEYS = {
    "text-column": "text_column",
    "label-column": "label_column",
    "instruction-column": "instruction_column",
    "response-column": "response_column",
}
FLOOR_KEYS = ("dp-delta", "dp-max-grad-norm")
SIMULATION_ENV = "FEDLORA_NODE_STATE_ROOT"  # set by ``fedlora simulate`` only (clients.privacy)


class FloorError(ValueError):
    """The server's request would weaken this node's privacy floor or read data it did not choose."""


@dataclass(frozen=True)
class PrivacyFloor:
    """A node's own DP requirements (none when the node sets no ``dp-epsilon``)."""

    epsilon: float
    delta: float = DEFAULT_NODE_DELTA
    max_grad_norm: float = 0.0  # 0: any clip

    def check(self, cfg: RunConfig) -> None:
        """Raise :class:`FloorError` if the run's privacy settings are weaker than this floor."""
        p = cfg.privacy
        if p.mode != "record":
            raise FloorError(
                f"the run's privacy.mode = {p.mode!r} would switch off this node's record-level DP "
                f"(node-config dp-epsilon = {self.epsilon:g}); the node trains only with mode 'record'"
            )
        if p.delta > self.delta:
            raise FloorError(
                f"the run's privacy.delta = {p.delta:g} is above this node's δ {self.delta:g} "
                "(node-config dp-delta)"
            )
        if self.max_grad_norm and p.max_grad_norm > self.max_grad_norm:
            raise FloorError(
                f"the run's privacy.max_grad_norm = {p.max_grad_norm:g} is above this node's "
                f"{self.max_grad_norm:g} (node-config dp-max-grad-norm)"
            )


def _positive(conf: Mapping[str, Any], key: str, default: float) -> float:
    if key not in conf:
        return default
    try:
        value = float(conf[key])
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigError(f"invalid node-config {key} = {conf[key]!r}: expected a finite number > 0")
    return value


def privacy_floor(conf: Mapping[str, Any]) -> PrivacyFloor | None:
    """Return the node's privacy floor from its normalised node-config, or None without ``dp-epsilon``."""
    if "dp-epsilon" not in conf:
        return None
    return PrivacyFloor(
        epsilon=_positive(conf, "dp-epsilon", 0.0),
        delta=_positive(conf, "dp-delta", DEFAULT_NODE_DELTA),
        max_grad_norm=_positive(conf, "dp-max-grad-norm", 0.0),
    )


def node_data(cfg: DataConfig, conf: Mapping[str, Any], data_path: str, data_format: str) -> DataConfig:
    """Return the data settings this node reads with: its file and its columns, or the run's partition.

    Raises
    ------
    FloorError
        Without ``data-path``, when the run names a data file outside ``fedlora simulate``.
    """
    if data_path:
        columns = {field: str(conf[key]) for key, field in COLUMN_KEYS.items() if key in conf}
        return replace(cfg, source=data_path, format=data_format, **{**_default_columns(), **columns})
    if cfg.source != "embedded" and not os.environ.get(SIMULATION_ENV):
        raise FloorError(
            "this node has no data-path, and it reads no file the server names "
            f"(the run's data.source is {cfg.source!r}); set data-path in the node-config"
        )
    return cfg


def _default_columns() -> dict[str, str]:
    d = DataConfig()
    return {field: getattr(d, field) for field in COLUMN_KEYS.values()}
