"""Pure checks of what reaches the round loop from outside: checkpoints, losses, federation size.

Each one answers a finding of the hostile-node probe (docs/security.md): a NaN or absurd-round
checkpoint was resumed, one node set the federation's reported train loss (-2.5e14), and in
2 to 4 nodes one liar set most of a round's change without the operator being told.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fedlora.config import RunConfig
from server.resume import ResumeError
from strategies.robust import (
    SMALL_FEDERATION,
    SMALL_NORM_BOUND,
    SMALL_WEIGHT_FACTOR,
    liar_share,
    lower_median,
)


def small_federation_warning(nodes: int, cfg: RunConfig) -> str:
    """Return the warning for a federation small enough that one node sets much of a round ("" if none)."""
    if not 2 <= nodes <= SMALL_FEDERATION:
        return ""
    share = liar_share(nodes, cfg.robust.norm_bound, cfg.robust.max_weight_factor)
    return (
        f"{nodes} nodes: one hostile node can set up to {share:.0%} of a round's change "
        f"(an honest one {1 / nodes:.0%}); rounds of at most {SMALL_FEDERATION} updates clip norms to "
        f"{SMALL_NORM_BOUND:g}x and weights to {SMALL_WEIGHT_FACTOR:g}x the median (docs/security.md)"
    )


def _tensors(value: object) -> Iterable[tuple[str, torch.Tensor]]:
    """Yield ``(path, tensor)`` for every tensor nested in dicts, lists and tuples of ``value``."""
    if isinstance(value, torch.Tensor):
        yield "", value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from ((f"{k}/{p}".rstrip("/"), t) for p, t in _tensors(v))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            yield from ((f"{i}/{p}".rstrip("/"), t) for p, t in _tensors(v))


def check_resumable(ckpt: Mapping[str, Any], num_rounds: int, path: Path) -> None:
    """Refuse a checkpoint whose round is not in ``0..num_rounds`` or that holds a non-finite tensor.

    A NaN state would be sent to every client; a round of 10^9 made a resumed run exit 0
    having done nothing.

    Raises
    ------
    ResumeError
        Naming the checkpoint, the problem and the fix.
    """
    rnd = ckpt.get("round")
    if isinstance(rnd, bool) or not isinstance(rnd, int) or not 0 <= rnd <= num_rounds:
        raise ResumeError(
            f"checkpoint {path} is at round {rnd!r}, outside 0..{num_rounds} (federation.num_rounds); "
            "raise num_rounds to continue a longer run, or start a new out-dir"
        )
    for part in ("state", "strategy"):
        for name, t in _tensors(ckpt.get(part, {})):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ResumeError(
                    f"checkpoint {path} holds non-finite values in {part} tensor {name!r}; it cannot be "
                    "resumed (restore checkpoint.pt.prev or start a new out-dir)"
                )


def summary_loss(losses: Sequence[tuple[int, float]]) -> float | None:
    """Return the round's reported train loss: the lower median of the clients' losses (None if none).

    Not the example-weighted mean: one node reporting -2.5e14 set the federation's loss. A
    median of the reports that can be losses (finite, >= 0) moves at most to a neighbouring
    honest value when one node lies (with two nodes the smaller of the two).
    """
    valid = [loss for _, loss in losses if math.isfinite(loss) and loss >= 0]
    return lower_median(valid) if valid else None
