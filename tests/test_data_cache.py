"""The data set is generated and partitioned once per process, cached by everything it depends on."""

import os

import pytest

from clients.node import local_data, node_settings
from fedlora.config import DataConfig, RunConfig, with_overrides
from fedlora.data import cached


@pytest.fixture
def builds(monkeypatch):
    """Count how often a data set is really built: generated (embedded) or read (files)."""
    from fedlora.data import embedded, sources

    cached.clear()
    calls = []
    real_gen, real_read = embedded.embedded_splits, sources.read_rows

    def generate(*args, **kwargs):
        calls.append(("embedded", args))
        return real_gen(*args, **kwargs)

    def read(*args, **kwargs):
        calls.append(("file", args))
        return real_read(*args, **kwargs)

    monkeypatch.setattr(embedded, "embedded_splits", generate)
    monkeypatch.setattr(sources, "read_rows", read)
    yield calls
    cached.clear()


def test_every_client_of_a_process_shares_one_generated_data_set(builds):
    cfg = with_overrides(
        RunConfig(),
        {
            "model.task": "classification",
            "data.num_train": 80,
            "data.num_test": 20,
            "federation.num_clients": 4,
        },
    )
    labels = tuple(cached.task_data(cfg.data, "classification").labels)
    parts = [
        local_data(cfg, node_settings(cfg, {"partition-id": i, "num-partitions": 4}), labels)
        for i in range(4)
    ]
    for _ in range(3):  # later rounds: nothing rebuilt
        local_data(cfg, node_settings(cfg, {"partition-id": 2, "num-partitions": 4}), labels)
    assert len(builds) == 1
    assert sum(len(train) + len(val) for train, val in parts) == 80
    assert cached.partitions(cfg.data, "classification", 4) is cached.partitions(
        cfg.data, "classification", 4
    )
    # A different input is a different entry.
    cached.task_data(DataConfig(num_train=80, num_test=20, seed=1), "classification")
    assert len(builds) == 2


def test_an_edited_data_file_is_read_again(builds, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{'ab'[i % 2]}\n" for i in range(10)))
    cfg = DataConfig(source=str(path), test_fraction=0.2)
    first = cached.task_data(cfg, "classification")
    assert cached.task_data(cfg, "classification") is first
    path.write_text("text,label\n" + "".join(f"row {i},{'abc'[i % 3]}\n" for i in range(20)))
    os.utime(path, ns=(1, 1))  # a different stamp even within one clock tick
    second = cached.task_data(cfg, "classification")
    assert len(builds) == 2  # read once per content
    assert len(second.train) + len(second.test) == 20 and len(second.labels) == 3
