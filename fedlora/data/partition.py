"""Split training records across clients: IID, Dirichlet(alpha) label skew, or label shards.

The partitioners are Flower Datasets' (``flwr_datasets.partitioner``): IID slices of a seeded
shuffle; Dirichlet label skew (Hsu et al., 2019: each label's examples are spread over clients
with proportions drawn from Dir(alpha); small alpha = strong skew); and shards (McMahan et
al., 2017: sort by label, cut into shards, give each client ``shards_per_client``). Every
client gets the same split for the same seed, so clients can partition independently.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig
from fedlora.data.sources import DataError, Record


def partition_records(records: Sequence[Record], num_clients: int, cfg: DataConfig) -> list[list[Record]]:
    """Return ``num_clients`` disjoint lists of records.

    Raises
    ------
    DataError
        If a partition would be empty, or a label-based partitioner is used without labels.
    """
    if num_clients < 1:
        raise DataError(f"cannot partition data for {num_clients} clients")
    if len(records) < num_clients:
        raise DataError(
            f"{len(records)} training records cannot be split across {num_clients} clients; "
            "add data or use fewer clients"
        )
    shuffled = list(records)
    random.Random(cfg.seed).shuffle(shuffled)
    if cfg.partitioner != "iid" and "label" not in shuffled[0]:
        raise DataError(
            f"partitioner {cfg.partitioner!r} needs labels; use data.partitioner = 'iid' for causal-lm data"
        )
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, ShardPartitioner

    ds = Dataset.from_dict(
        {"idx": list(range(len(shuffled))), "label": [r.get("label", 0) for r in shuffled]}
    )
    if cfg.partitioner == "iid":
        partitioner: Any = IidPartitioner(num_partitions=num_clients)
    elif cfg.partitioner == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            alpha=cfg.dirichlet_alpha,
            min_partition_size=min(10, len(shuffled) // num_clients),
            self_balancing=False,
            seed=cfg.seed,
        )
    else:
        partitioner = ShardPartitioner(
            num_partitions=num_clients,
            partition_by="label",
            num_shards_per_partition=cfg.shards_per_client,
            seed=cfg.seed,
        )
    partitioner.dataset = ds
    parts = []
    for cid in range(num_clients):
        try:
            idx = partitioner.load_partition(cid)["idx"]
        except ValueError as err:
            raise DataError(
                f"partitioner {cfg.partitioner!r} failed for {num_clients} clients: {err}"
            ) from err
        if not idx:
            raise DataError(
                f"client {cid} got an empty partition with partitioner {cfg.partitioner!r}; "
                "use more data, fewer clients, a larger data.dirichlet_alpha or more data.shards_per_client"
            )
        parts.append([shuffled[i] for i in idx])
    return parts


def split_local(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Split one client's records into local train and local validation (at least one train record)."""
    n_val = int(len(records) * fraction)
    if n_val >= len(records):
        n_val = len(records) - 1
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i] for i in order[n_val:]], [records[i] for i in order[:n_val]]


def summarize(parts: Sequence[Sequence[Record]], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Return per-client sizes and label histograms (label names as keys)."""
    out = []
    for cid, part in enumerate(parts):
        hist = Counter(r["label"] for r in part if "label" in r)
        out.append(
            {
                "client": cid,
                "size": len(part),
                "labels": {labels[k] if labels else str(k): hist[k] for k in sorted(hist)},
            }
        )
    return out


def format_summary(summary: Sequence[dict[str, Any]]) -> str:
    """Render :func:`summarize` output as an aligned text table."""
    lines = ["client  size  label histogram"]
    for row in summary:
        hist = ", ".join(f"{k}={v}" for k, v in row["labels"].items()) or "-"
        lines.append(f"{row['client']:>6}  {row['size']:>4}  {hist}")
    return "\n".join(lines)


def save_summary(summary: Sequence[dict[str, Any]], path: Path) -> None:
    """Write the partition summary as JSON."""
    path.write_text(json.dumps(list(summary), indent=2), encoding="utf-8")
