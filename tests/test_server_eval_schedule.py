"""Server evaluation schedule, round timing fields and reproducibility over Flower's random node ids.

Runs the real :class:`server.loop.ServerRun` on the in-process grid of the adversary tests
(no Ray): a handful of seconds in all.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict

from fedlora.checkpoint import load_checkpoint
from fedlora.config import ConfigError, OutputConfig, RunConfig, with_overrides
from fedlora.protocol import TrainReply, TrainRequest
from fedlora.train import trim_padding
from server.loop import NodeInfo, ServerRun, by_partition, is_eval_round
from server.outputs import progress_line
from strategies.base import ClientSpec
from tests.adversary.fakegrid import NUM_EXAMPLES, FakeGrid, HonestNode, small_config


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 8 held-out examples: thread wake-ups cost more than the math
    yield
    torch.set_num_threads(before)


def test_eval_rounds_every_k_and_always_the_last():
    every2 = OutputConfig(eval_every=2, eval_initial=False)
    assert [r for r in range(0, 6) if is_eval_round(r, 5, every2)] == [2, 4, 5]
    every3 = OutputConfig(eval_every=3)
    assert [r for r in range(0, 7) if is_eval_round(r, 6, every3)] == [0, 3, 6]
    assert [r for r in range(0, 4) if is_eval_round(r, 3, OutputConfig())] == [0, 1, 2, 3]


def test_eval_every_is_validated_with_the_field_named():
    with pytest.raises(ConfigError, match=r"output.eval_every = 0: expected an integer >= 1"):
        with_overrides(RunConfig(), {"output.eval_every": "0"})
    with pytest.raises(ConfigError, match=r"output\.eval_initial"):
        with_overrides(RunConfig(), {"output.eval_initial": "sometimes"})
    cfg = with_overrides(RunConfig(), {"output.eval-every": "3", "output.eval_initial": "false"})
    assert (cfg.output.eval_every, cfg.output.eval_initial) == (3, False)


def test_nodes_are_ordered_by_partition_not_by_flower_node_id():
    infos = {
        n: NodeInfo(ClientSpec(node_id=n, rank=2, alpha=4.0), 10, p)
        for n, p in [(900, 0), (7, 1), (300, 2), (55, 3)]
    }
    assert by_partition([7, 55, 300, 900], infos) == [900, 7, 300, 55]
    assert by_partition({55, 900}, infos) == [900, 55]


def test_trim_padding_drops_only_columns_padded_in_every_row():
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 0, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([1, 0])
    t_ids, t_mask, t_labels = trim_padding(ids, mask, labels)
    assert t_ids.tolist() == [[5, 6, 7], [5, 6, 0]] and t_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert t_labels is labels  # class labels are per example
    seq_labels = torch.tensor([[-100, 6, 7, -100, -100], [-100, 6, -100, -100, -100]])
    assert trim_padding(ids, mask, seq_labels)[2].tolist() == [[-100, 6, 7], [-100, 6, -100]]
    left = torch.tensor([[0, 0, 5], [0, 6, 5]])  # left padding ends in real tokens: kept whole
    assert trim_padding(left, (left != 0).long(), labels)[0] is left


def _run(out: Path, grid: FakeGrid, **over: object) -> list[dict]:
    import server.loop

    cfg = small_config(out, **over)
    plot = server.loop.plot_metrics
    server.loop.plot_metrics = lambda *a, **k: None  # matplotlib is not under test here
    try:
        ServerRun(grid, cfg, out).run()
    finally:
        server.loop.plot_metrics = plot
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]


def test_rounds_between_evaluations_carry_no_scores_and_seconds_cover_evaluation(tmp_path, task_identity):
    grid = FakeGrid([HonestNode(11 + i, i) for i in range(4)])
    rows = _run(
        tmp_path / "run",
        grid,
        **{"federation.num_rounds": 3, "output.eval_every": 2, "output.eval_initial": False},
    )
    glob = {r["round"]: r for r in rows if r["kind"] == "global"}
    assert sorted(glob) == [0, 1, 2, 3]  # round 0 still records the setup (who was left out)
    scored = [r for r in glob if glob[r]["test_accuracy"] is not None]
    assert scored == [2, 3]
    for r, row in glob.items():
        if r in scored:
            assert row["test_loss"] is not None
            assert 0.0 < row["eval_seconds"] <= row["seconds"]
        else:
            assert row["test_loss"] is None and row["eval_seconds"] == 0.0
            assert "test acc   -  " in progress_line(row, 3)


class PartitionNode(HonestNode):
    """An honest node whose update depends on its partition (its data), not on Flower's node id."""

    def train(self, msg: Message) -> RecordDict:
        req = TrainRequest.from_message(msg)
        gen = torch.Generator().manual_seed(1000 * req.round + self.partition)
        names = [k for k in req.adapter if req.train_a or ".lora_A." not in k]
        update = {k: 1e-2 * torch.randn(req.adapter[k].shape, generator=gen) for k in sorted(names)}
        return TrainReply(NUM_EXAMPLES, update, {"train-loss": 1.0}).to_content()


class ReversingGrid(FakeGrid):
    """Replies come back in the reverse order of the messages (nodes that finish in another order)."""

    def send_and_receive(self, messages, *, timeout=None):
        return list(reversed(super().send_and_receive(messages, timeout=timeout)))


def test_same_seed_same_run_whatever_node_ids_flower_draws(tmp_path, task_identity):
    """Flower draws new node ids every run: sampling and aggregation order must not follow them."""
    over = {"federation.clients_per_round": 2, "federation.num_rounds": 2, "output.eval_initial": False}
    first = FakeGrid([PartitionNode(11 + i, i) for i in range(4)])
    second = ReversingGrid([PartitionNode(n, p) for n, p in [(90, 0), (40, 1), (70, 2), (10, 3)]])
    rows_a = _run(tmp_path / "a", first, **over)
    rows_b = _run(tmp_path / "b", second, **over)
    parts = [
        sorted((r["round"], r["partition"]) for r in rows if r["kind"] == "client")
        for rows in (rows_a, rows_b)
    ]
    assert parts[0] == parts[1]
    state_a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")["state"]
    state_b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")["state"]
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    acc = [[r["test_accuracy"] for r in rows if r["kind"] == "global"] for rows in (rows_a, rows_b)]
    assert acc[0] == acc[1]
