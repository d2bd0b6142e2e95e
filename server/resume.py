"""Resuming a run: which configuration changes are safe, and refusing the ones that mix runs.

A checkpoint records the configuration it was written under. Resuming with a different
strategy, rank, model, task, data split, client set or privacy setting would silently mix two
runs (and two privacy accountings) in one model, so :func:`config_changes` refuses it, listing
every difference. Changes that only extend or tune the run (more rounds, timeouts, the output
location, server-side robustness knobs, evaluation batch size, device) are allowed and
returned so the caller can record them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig

SAFE_PREFIXES = (
    "federation.num_rounds",
    "federation.round_timeout",
    "federation.node_wait_timeout",
    "output.",
    "robust.",
    "train.eval_batch_size",
    "train.device",
)


class ResumeError(ConfigError):
    """The new configuration differs from the checkpoint's in ways that would mix two runs."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        is_section = isinstance(value, Mapping) and not prefix
        out.update(_flatten(value, name + ".") if is_section else {name: value})
    return out


def config_changes(checkpoint_json: str, new: RunConfig) -> list[str]:
    """Return the safe differences ``old -> new``; raise :class:`ResumeError` on any unsafe one.

    Fields missing from an older checkpoint's configuration count as unchanged.
    """
    try:
        old = _flatten(json.loads(checkpoint_json))
    except (json.JSONDecodeError, AttributeError, TypeError) as err:
        raise ResumeError(f"the checkpoint's configuration is unreadable ({err}); start a new run") from err
    now = _flatten(new.to_dict())
    safe, unsafe = [], []
    for key in sorted(now):
        if key not in old or old[key] == now[key] or key == "output.resume":  # resuming is the point
            continue
        change = f"{key}: {old[key]!r} -> {now[key]!r}"
        (safe if key.startswith(SAFE_PREFIXES) else unsafe).append(change)
    if unsafe:
        raise ResumeError(
            "cannot resume: the configuration differs from the checkpoint's in ways that would mix two "
            "runs:\n  "
            + "\n  ".join(unsafe)
            + "\nrestore those values, or start a new run in another out-dir"
        )
    return safe


CHECKPOINT = "checkpoint.pt"
# What a run directory records of the configuration a run was started with, most exact first:
# ``fedlora simulate`` writes resolved_config.json, every ServerApp writes config.toml.
RUN_CONFIG_FILES = ("resolved_config.json", "config.toml")


def run_config_of(run_dir: str | Path) -> RunConfig | None:
    """Return the configuration the run in ``run_dir`` was started with, or None if no run is there.

    ``--resume`` starts from it, so a user types only what changes (``fedlora simulate --out
    DIR --resume``, or ``--rounds 10`` to extend the run); flags on top are changes that
    :func:`config_changes` checks against the checkpoint.
    """
    from fedlora.config import from_json, load_toml

    for name in RUN_CONFIG_FILES:
        path = Path(run_dir) / name
        if path.is_file():
            return from_json(path.read_text(encoding="utf-8")) if name.endswith(".json") else load_toml(path)
    return None


def check_resume(run_dir: Path, cfg: RunConfig) -> list[str]:
    """Refuse resuming ``run_dir`` with ``cfg`` before anything is written; return the safe changes.

    The ServerApp checks again when it resumes (:meth:`server.loop.ServerRun._resume`); this
    lets ``fedlora simulate`` refuse while the run directory is still exactly as it was.
    No checkpoint yet (a run that stopped before its first round) is no change: it starts over.

    Raises
    ------
    ResumeError
        For a checkpoint that cannot be resumed or a configuration that would mix two runs.
    """
    from fedlora.checkpoint import load_checkpoint, prev_path
    from server.checks import check_resumable

    path = Path(run_dir) / CHECKPOINT
    if not (path.exists() or prev_path(path).exists()):
        return []
    ckpt = load_checkpoint(path)
    check_resumable(ckpt, cfg.federation.num_rounds, path)
    return config_changes(str(ckpt.get("config", "{}")), cfg)
