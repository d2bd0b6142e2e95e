"""Every aggregation method and both DP modes, end to end in the Flower Simulation Engine.

Each run is made once per module (``strategy_run``) and shared by the tests that read it: the
simulation runs are the biggest cost of the suite.
"""

import io
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedlora.adapters import is_lora_a, split_state
from fedlora.checkpoint import load_checkpoint, prev_path
from fedlora.config import RunConfig, with_overrides
from server.outputs import read_metrics
from simulations.runner import simulate
from tests.test_simulation import SMALL, assert_adapter_moves, assert_learns, global_rows, run_small

pytestmark = pytest.mark.slow

RANKS = {"fair": "", "hetlora": "4,8", "flexlora": "4,8", "flora": "4,8"}
FFA_DP = {"federation.strategy": "ffa", "privacy.mode": "record", "privacy.epsilon": 4.0}


def strategy_overrides(strategy: str) -> dict:
    over = {"federation.strategy": strategy}
    if RANKS[strategy]:
        over["lora.ranks"] = RANKS[strategy]
    return over


@pytest.fixture(scope="module")
def strategy_run(tmp_path_factory):
    """Return ``run(name) -> (run_dir, metrics)``, simulating each configuration once per module."""
    runs: dict[str, tuple] = {}
    tmp = tmp_path_factory.mktemp("strategies")

    def run(name: str):
        if name not in runs:
            over = FFA_DP if name == "ffa-dp" else strategy_overrides(name)
            _, metrics = run_small(tmp, name, **over)
            runs[name] = (tmp / name, metrics)
        return runs[name]

    return run


@pytest.mark.parametrize("strategy", list(RANKS))
def test_strategy_runs_end_to_end(strategy_run, strategy):
    run_dir, metrics = strategy_run(strategy)
    glob = global_rows(metrics)
    assert [m["round"] for m in glob] == [0, 1, 2]
    assert all(m["clients_ok"] == 2 and not m["rejected"] for m in glob[1:]), glob
    clients = [m for m in metrics if m["kind"] == "client"]
    if RANKS[strategy]:
        assert sorted({(m["partition"], m["client"]["rank"]) for m in clients}) == [(0, 4), (1, 8)]
    pairs, _ = split_state(load_file(str(run_dir / "adapter" / "adapter_model.safetensors")))
    assert pairs
    if strategy == "flora":
        # The exported adapter is the stacked update: rank = sum of client ranks x rounds.
        assert {p.rank for p in pairs.values()} == {2 * (4 + 8)}


@pytest.mark.parametrize("strategy", list(RANKS))
def test_strategy_learns_and_moves_the_global_adapter_every_round(strategy_run, strategy):
    run_dir, metrics = strategy_run(strategy)
    assert_learns(metrics)
    assert_adapter_moves(run_dir, strategy)


def test_checkpoint_holds_the_round_state_and_floras_merge(strategy_run):
    run_dir, _ = strategy_run("flora")
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    assert {"round", "state", "strategy", "privacy", "config"} <= set(ckpt)
    assert ckpt["round"] == 2 and json.loads(ckpt["config"])["federation"]["strategy"] == "flora"
    strat = ckpt["strategy"]
    assert (strat["global_rank"], strat["global_scale"], strat["rounds"]) == (8, 2.0, 2)
    # 12 adapted modules; two rounds of two clients (ranks 4 and 8) stacked: rank 24.
    pairs, _ = split_state(strat["merge"])
    assert len(pairs) == 12 and {p.rank for p in pairs.values()} == {24}
    # The exported adapter is that merge (PEFT names; the scale is folded into A, alpha = r).
    exported = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    for module, pair in pairs.items():
        a = next(v for k, v in exported.items() if k.endswith(module + ".lora_A.weight"))
        b = next(v for k, v in exported.items() if k.endswith(module + ".lora_B.weight"))
        torch.testing.assert_close(b.double() @ a.double(), pair.b.double() @ pair.a.double())
    # The template (fresh LoRA each round) is what round 1 started from: B stays zero.
    assert all(not torch.count_nonzero(v) for k, v in ckpt["state"].items() if ".lora_B." in k)
    assert load_checkpoint(prev_path(run_dir / "checkpoint.pt"))["strategy"]["rounds"] == 1


def _comparable(metrics: list[dict]) -> list[dict]:
    """Metrics rows without wall-clock times and Flower's per-run random node ids."""

    def strip(row):
        if isinstance(row, dict):
            return {k: strip(v) for k, v in row.items() if "seconds" not in k and k != "node"}
        if isinstance(row, list):  # e.g. the clipped nodes of a round
            return [strip(v) for v in row]
        return row

    rows = [strip(m) for m in metrics if m["kind"] in ("global", "client")]
    return sorted(rows, key=lambda m: (m["round"], m["kind"], m.get("partition", -1)))


def test_resumed_run_ends_with_the_rows_of_an_uninterrupted_run(strategy_run, tmp_path):
    # FLoRA: the resumed server must restore its cumulative merge, not only the global tensors.
    src, metrics = strategy_run("flora")
    dst = tmp_path / "resumed"
    shutil.copytree(src, dst)
    # A crash while round 2 was being checkpointed: the round-1 checkpoint is the newest intact
    # one, and the round-2 rows already in metrics.jsonl must be dropped and redone.
    (dst / "checkpoint.pt").unlink()
    prev_path(dst / "checkpoint.pt").rename(dst / "checkpoint.pt")
    shutil.rmtree(dst / "adapter")
    over = {**SMALL, **strategy_overrides("flora"), "output.out_dir": str(dst), "output.resume": True}
    simulate(with_overrides(RunConfig(), over))
    resumed = read_metrics(dst / "metrics.jsonl")
    assert _comparable(resumed) == _comparable(metrics)
    a = load_file(str(src / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(dst / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _npy_header_bytes(shape, dtype="<f4") -> int:
    buf = io.BytesIO()
    np.save(buf, np.zeros(shape, dtype=dtype))
    return len(buf.getvalue()) - int(np.prod(shape)) * np.dtype(dtype).itemsize


def test_ffa_under_record_level_dp_sends_only_b_and_meets_target(strategy_run):
    run_dir, metrics = strategy_run("ffa-dp")
    clients = [m for m in metrics if m["kind"] == "client"]
    assert len(clients) == 4 and all(0 < m["client"]["dp_epsilon"] <= 4.0 for m in clients)
    report = json.loads((run_dir / "privacy_report.json").read_text())
    assert report["facts"]["mode"] == "record"
    assert len(report["clients"]) == 2
    # The report shows every client at or under the target (the budget's accountant is PRV).
    assert all(c["within_budget"] and c["epsilon_prv"] <= 4.0 for c in report["clients"])
    assert all(c["rounds"] == [1, 2] for c in report["clients"])
    html = (run_dir / "privacy_report.html").read_text()
    assert "client-0" in html and "client-1" in html
    # FFA-LoRA sends B (and the head) only: about half of what FedIT sends (A and B and head).
    from fedlora.adapters import num_bytes
    from fedlora.models import adapter_state, get_lora_model

    full = num_bytes(adapter_state(get_lora_model("minilm", "classification", 4, 4, 8.0), 4))
    assert all(0.4 * full < m["client"]["bytes_up"] < 0.6 * full for m in clients)


def test_ffa_upload_is_exactly_the_documented_bytes_and_a_stays_frozen(strategy_run):
    run_dir, metrics = strategy_run("ffa-dp")
    clients = [m for m in metrics if m["kind"] == "client"]
    # FFA-LoRA sends B and the head only. docs/strategies.md: at rank r, 12 modules' B of
    # 384 x r float32 plus the 4 x 384 + 4 head (6,160 B); at r = 4 that is 79,888 B of values.
    # On the wire the update is one packed record (fedlora/protocol_arrays.py): the values as one
    # flat float32 array, plus the manifest (compact JSON [[name, shape, offset], ...] in the
    # client's adapter order), each array with its .npy header; metrics count all of it.
    from fedlora.models import adapter_state, get_lora_model

    full = adapter_state(get_lora_model("minilm", "classification", 4, 4, 8.0), 4)
    sent = {k: v for k, v in full.items() if not is_lora_a(k)}
    assert sum(v.numel() * 4 for v in sent.values()) == 12 * 384 * 4 * 4 + 6_160 == 79_888
    offsets = np.cumsum([0] + [v.numel() for v in sent.values()])
    entries = [[k, list(v.shape), int(o)] for (k, v), o in zip(sent.items(), offsets, strict=False)]
    manifest = len(json.dumps(entries, separators=(",", ":")))
    framing = _npy_header_bytes((79_888 // 4,)) + manifest + _npy_header_bytes((manifest,), "|u1")
    assert all(m["client"]["bytes_up"] == 79_888 + framing for m in clients)
    # The shared frozen A never changes; the global B does, every round.
    assert_adapter_moves(run_dir, "ffa")


def test_client_level_dp_with_poisson_client_sampling(tmp_path):
    _, metrics = run_small(
        tmp_path,
        "cdp",
        **{
            "privacy.mode": "client",
            "privacy.noise_multiplier": 0.5,
            "privacy.client_sampling": "poisson",
            "privacy.client_sample_rate": 0.9,
            "train.local_steps": 1,
        },
    )
    glob = global_rows(metrics)
    assert [m["round"] for m in glob] == [0, 1, 2]
    ledger = json.loads((tmp_path / "cdp" / "privacy" / "ledger.json").read_text())
    entries = ledger["ledgers"]["all-clients"]["entries"]
    # Not vacuous on an empty ledger: every round is accounted, each with Poisson sampling.
    assert len(entries) >= 2
    assert all(e["sampling"] == "poisson" and e["sample_rate"] == 0.9 for e in entries)
    assert ledger["facts"]["amplification_assumed"] is True


def test_client_level_dp_refuses_nonlinear_strategies(tmp_path):
    from server.privacy import ServerPrivacy

    cfg = with_overrides(
        RunConfig(),
        {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "federation.strategy": "flexlora"},
    )
    with pytest.raises(ValueError, match="flexlora"):
        ServerPrivacy(cfg, tmp_path)
