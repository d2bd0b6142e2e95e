"""Setup admission: which nodes that answered the setup query take part in the run.

A setup reply that decodes (:func:`fedlora.protocol.decode_setup_reply`) can still be
inconsistent with the run: a rank the run did not configure, an alpha that is not the run's
for that rank, or a partition id another node claims as well. Such a node is left out with a
reason; no setup reply ends the run (before this check a rank-3 reply in a rank-2 FedIT run
reached ``require_uniform`` and stopped the ServerApp).

Rules (each one names its reason in metrics.jsonl's round-0 ``rejected`` list):

* the rank must be one the run configures: ``lora.ranks`` when set, else ``lora.rank``. A node
  that sets its own ``lora-rank`` in node-config must therefore use a rank listed in the
  server's ``lora.ranks``; a claim at the model's ceiling (384 on MiniLM) cannot grow the
  server state or every FLoRA download;
* the alpha must be the run's alpha for that rank (``lora.alpha_for(rank)``; honest nodes
  cannot set alpha themselves);
* a partition id claimed by two or more nodes leaves every claimant out: the server cannot
  tell the owner from the impostor, and a ledger copy or partition binding must not go to
  the wrong one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

from fedlora.config import RunConfig
from fedlora.protocol import SetupReply


def allowed_ranks(cfg: RunConfig) -> tuple[int, ...]:
    """Return the ranks a node may report: ``lora.ranks`` when set, else ``(lora.rank,)``."""
    return tuple(sorted(set(cfg.lora.ranks or (cfg.lora.rank,))))


def admit(
    replies: Mapping[int, SetupReply], cfg: RunConfig, *, shared_partitions_left_out: bool = True
) -> tuple[dict[int, SetupReply], list[dict[str, Any]]]:
    """Split decoded setup replies into admitted nodes and ``{"node", "reason"}`` for each left out.

    Parameters
    ----------
    replies
        Node id -> its decoded setup reply.
    cfg
        The run configuration (configured ranks and alpha).
    shared_partitions_left_out
        Leave out every node that shares its partition id (the default). Client-level DP passes
        False: a node's admission may depend only on its own reply, or one added node could push
        an honest one out and a neighbouring federation would differ in two clients.

    Returns
    -------
    tuple
        (admitted node id -> reply, in node order; the nodes left out with their reasons).
    """
    ranks = allowed_ranks(cfg)
    kept: dict[int, SetupReply] = {}
    left_out: list[dict[str, Any]] = []
    for node in sorted(replies):
        info = replies[node]
        if info.rank not in ranks:
            reason = f"setup reply rank {info.rank} is not one the run configures ({list(ranks)}; lora.ranks)"
        elif not math.isclose(info.alpha, cfg.lora.alpha_for(info.rank), rel_tol=1e-6):
            reason = (
                f"setup reply alpha {info.alpha:g} differs from the run's alpha "
                f"{cfg.lora.alpha_for(info.rank):g} for rank {info.rank}"
            )
        else:
            kept[node] = info
            continue
        left_out.append({"node": node, "reason": reason})
    if not shared_partitions_left_out:
        return kept, left_out
    claims = Counter(info.partition_id for info in kept.values())
    for node in sorted(kept):
        pid = kept[node].partition_id
        if claims[pid] > 1:
            left_out.append(
                {
                    "node": node,
                    "reason": f"partition-id {pid} is claimed by {claims[pid]} nodes; every claimant "
                    "is left out (give each SuperNode its own partition-id)",
                }
            )
    return {n: i for n, i in kept.items() if claims[i.partition_id] == 1}, left_out
