"""The run's data set and its partition, built once per process and cached by their inputs.

A simulation asks for the same data many times: the driver prints the partition summary,
the server holds out the test split, and every client message in every Ray actor needs its
partition. Generating and partitioning for each of those is O(clients x examples) of
repeated work, so :func:`task_data` and :func:`partitions` memoise on everything the result
depends on: the (frozen, hashable) :class:`~fedlora.config.DataConfig`, the task, the
number of partitions and, for files, their size and modification time (an edited file is
read again). Callers get shared objects and must not mutate them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig
from fedlora.data.partition import partition_records
from fedlora.data.sources import Record, TaskData, load_task_data

# Entries kept per process: a run uses one data config; tests and benchmarks use a few.
MAX_ENTRIES = 8

_CACHE: OrderedDict[Hashable, Any] = OrderedDict()


def stamp(source: str) -> tuple[Any, ...]:
    """Return what identifies the current content of a data file or directory (``()`` if none)."""
    if not source or source == "embedded":
        return ()
    p = Path(source).expanduser()
    if p.is_file():
        st = p.stat()
        return (st.st_size, st.st_mtime_ns)
    if p.is_dir():
        return tuple(
            sorted((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in p.rglob("*") if f.is_file())
        )
    return ()


def _memo(key: Hashable, build: Any) -> Any:
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return _CACHE[key]
    value = build()
    _CACHE[key] = value
    while len(_CACHE) > MAX_ENTRIES:
        _CACHE.popitem(last=False)
    return value


def task_data(cfg: DataConfig, task: str) -> TaskData:
    """Return :func:`~fedlora.data.sources.load_task_data` for ``(cfg, task)``, computed once."""
    key = ("data", cfg, task, stamp(cfg.source), stamp(cfg.test_source))
    return _memo(key, lambda: load_task_data(cfg, task))


def partitions(cfg: DataConfig, task: str, num_partitions: int) -> list[list[Record]]:
    """Return the training split cut into ``num_partitions`` client partitions, computed once."""
    key = ("parts", cfg, task, num_partitions, stamp(cfg.source), stamp(cfg.test_source))
    return _memo(key, lambda: partition_records(task_data(cfg, task).train, num_partitions, cfg))


def clear() -> None:
    """Forget every cached data set (tests that rewrite a file within one mtime tick)."""
    _CACHE.clear()
