"""Real Flower Simulation Engine runs (Ray backend) of the whole ServerApp + ClientApp."""

import itertools
import json

import pytest
import torch

from fedlora.config import RunConfig, with_overrides
from fedlora.evaluate import evaluate_adapter
from server.outputs import read_metrics
from simulations.runner import simulate

pytestmark = pytest.mark.slow

SMALL = {
    "data.num_train": 96,
    "data.num_test": 48,
    "model.max_length": 16,
    "train.local_steps": 10,  # enough local work that two rounds measurably improve held-out loss
    "train.batch_size": 8,
    "train.lr": 0.005,
    "federation.num_clients": 2,
    "federation.num_rounds": 2,
    "lora.rank": 4,
}


def run_small(tmp_path, name, **over) -> tuple[RunConfig, list[dict]]:
    cfg = with_overrides(RunConfig(), {**SMALL, "output.out_dir": str(tmp_path / name), **over})
    run_dir = simulate(cfg)
    return cfg, read_metrics(run_dir / "metrics.jsonl")


def global_rows(metrics: list[dict]) -> list[dict]:
    return sorted((m for m in metrics if m["kind"] == "global"), key=lambda m: m["round"])


def assert_learns(metrics: list[dict]) -> None:
    """Held-out loss improves from round 0 to the last round, and moves in every round.

    A server that dropped ``aggregate()``'s output (or a client whose training never reached
    the update) leaves the global adapter, and so the held-out loss, exactly as it was.
    """
    glob = global_rows(metrics)
    assert [g["round"] for g in glob] == list(range(SMALL["federation.num_rounds"] + 1))
    losses = [g["test_loss"] for g in glob]
    assert all(a != b for a, b in itertools.pairwise(losses)), f"adapter unchanged in a round: {losses}"
    assert losses[-1] < losses[0] - 0.005, f"held-out loss did not improve: {losses}"
    accs = [g["test_accuracy"] for g in glob]
    assert accs[-1] > accs[0], f"held-out accuracy did not improve: {accs}"


def assert_adapter_moves(run_dir, strategy: str) -> None:
    """The checkpointed global state differs after every round (round 0 has B = 0 everywhere)."""
    from fedlora.adapters import is_lora_a, is_lora_b
    from fedlora.checkpoint import load_checkpoint, prev_path

    last = load_checkpoint(run_dir / "checkpoint.pt")
    first = load_checkpoint(prev_path(run_dir / "checkpoint.pt"))
    assert (first["round"], last["round"]) == (1, 2)
    if strategy == "flora":
        # The fresh template stays; the update lives in the cumulative merge, which grows each round.
        m1, m2 = first["strategy"]["merge"], last["strategy"]["merge"]
        assert m1 and set(m1) == set(m2)
        for k in m1:
            assert torch.count_nonzero(m1[k]) > 0
            dim = 0 if is_lora_a(k) else 1
            assert m2[k].shape[dim] == 2 * m1[k].shape[dim]
            assert torch.equal(m2[k].narrow(dim, 0, m1[k].shape[dim]), m1[k])  # round 1 kept as is
        return
    b_names = [k for k in last["state"] if is_lora_b(k)]
    assert b_names
    assert all(torch.count_nonzero(first["state"][k]) > 0 for k in b_names)  # moved from B = 0
    assert any(not torch.equal(first["state"][k], last["state"][k]) for k in b_names)
    a_names = [k for k in last["state"] if is_lora_a(k)]
    a_moved = any(not torch.equal(first["state"][k], last["state"][k]) for k in a_names)
    assert a_moved is (strategy != "ffa")  # FFA-LoRA's A is frozen; every other method trains it


@pytest.fixture(scope="module")
def fedit_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sim")
    _, metrics = run_small(tmp, "fedit")
    return tmp / "fedit", metrics


def test_two_clients_two_rounds_complete_with_outputs(fedit_run):
    run_dir, metrics = fedit_run
    glob = [m for m in metrics if m["kind"] == "global"]
    assert [m["round"] for m in glob] == [0, 1, 2]
    assert all(m["clients_ok"] == 2 and not m["rejected"] for m in glob[1:])
    clients = [m for m in metrics if m["kind"] == "client"]
    assert sorted((m["round"], m["partition"]) for m in clients) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert all(m["client"]["bytes_up"] > 0 and m["client"]["bytes_down"] > 0 for m in clients)
    for name in [
        "config.toml",
        "metrics.png",
        "partitions.json",
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ]:
        assert (run_dir / name).is_file(), name
    assert json.loads((run_dir / "partitions.json").read_text())[0]["size"] == 48


def test_fedit_learns_and_moves_the_global_adapter_every_round(fedit_run):
    run_dir, metrics = fedit_run
    assert_learns(metrics)
    assert_adapter_moves(run_dir, "fedit")


def test_exported_adapter_reproduces_final_accuracy(fedit_run):
    run_dir, metrics = fedit_run
    final = [m for m in metrics if m["kind"] == "global"][-1]
    # `evaluate` on the embedded default scores the run's own held-out split (data.num_test = 48).
    res = evaluate_adapter(run_dir / "adapter", data="embedded")
    assert res["examples"] == 48
    assert res["accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-9)
    import pandas as pd

    from fedlora.config import DataConfig
    from fedlora.data.sources import load_task_data

    test = load_task_data(DataConfig(num_train=96, num_test=48), "classification").test
    labels = json.loads((run_dir / "adapter" / "fedlora.json").read_text())["labels"]
    path = run_dir / "test.csv"
    pd.DataFrame([{"text": r["text"], "label": labels[r["label"]]} for r in test]).to_csv(path, index=False)
    own = evaluate_adapter(run_dir / "adapter", data=str(path))
    assert own["accuracy"] == pytest.approx(final["test_accuracy"], abs=1e-9)
    assert own["loss"] == pytest.approx(final["test_loss"], rel=1e-4)
