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
