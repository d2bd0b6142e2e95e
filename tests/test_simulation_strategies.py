"""Every aggregation method and both DP modes, end to end in the Flower Simulation Engine."""

import json

import pytest
from safetensors.torch import load_file

from fedlora.adapters import split_state
from tests.test_simulation import run_small

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    ("strategy", "ranks"),
    [
        ("fair", ""),
        ("hetlora", "4,8"),
        ("flexlora", "4,8"),
        ("flora", "4,8"),
    ],
)
def test_strategy_runs_end_to_end(tmp_path, strategy, ranks):
    over = {"federation.strategy": strategy, "train.local_steps": 2}
    if ranks:
        over["lora.ranks"] = ranks
    _, metrics = run_small(tmp_path, strategy, **over)
    glob = [m for m in metrics if m["kind"] == "global"]
    assert [m["round"] for m in glob] == [0, 1, 2]
    assert all(m["clients_ok"] == 2 and not m["rejected"] for m in glob[1:]), glob
    clients = [m for m in metrics if m["kind"] == "client"]
    if ranks:
        assert sorted({(m["partition"], m["rank"]) for m in clients}) == [(0, 4), (1, 8)]
    pairs, _ = split_state(load_file(str(tmp_path / strategy / "adapter" / "adapter_model.safetensors")))
    assert pairs
    if strategy == "flora":
        # The exported adapter is the stacked update: rank = sum of client ranks x rounds.
        assert {p.rank for p in pairs.values()} == {2 * (4 + 8)}


def test_ffa_under_record_level_dp_sends_only_b_and_meets_target(tmp_path):
    _, metrics = run_small(
        tmp_path,
        "ffa-dp",
        **{
            "federation.strategy": "ffa",
            "privacy.mode": "record",
            "privacy.epsilon": 4.0,
            "train.local_steps": 2,
        },
    )
    clients = [m for m in metrics if m["kind"] == "client"]
    assert len(clients) == 4 and all(0 < m["client"]["dp_epsilon"] <= 4.0 for m in clients)
    ffa_up = clients[0]["client"]["bytes_up"]
    report = json.loads((tmp_path / "ffa-dp" / "privacy_report.json").read_text())
    assert report["facts"]["mode"] == "record"
    assert len(report["clients"]) == 2
    # The report shows every client at or under the target (the budget's accountant is PRV).
    assert all(c["within_budget"] and c["epsilon_prv"] <= 4.0 for c in report["clients"])
    assert all(c["rounds"] == [1, 2] for c in report["clients"])
    html = (tmp_path / "ffa-dp" / "privacy_report.html").read_text()
    assert "client-0" in html and "client-1" in html
    # FFA-LoRA sends B (and the head) only: about half of what FedIT sends (A and B and head).
    from fedlora.adapters import num_bytes
    from fedlora.models import adapter_state, get_lora_model

    full = num_bytes(adapter_state(get_lora_model("minilm", "classification", 4, 4, 8.0), 4))
    assert 0.4 * full < ffa_up < 0.6 * full


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
    glob = [m for m in metrics if m["kind"] == "global"]
    assert [m["round"] for m in glob] == [0, 1, 2]
    ledger = json.loads((tmp_path / "cdp" / "privacy" / "ledger.json").read_text())
    entries = ledger["ledgers"]["all-clients"]["entries"]
    assert [e["sampling"] for e in entries] == ["poisson"] * len(entries)
    assert ledger["facts"]["amplification_assumed"] is True


def test_client_level_dp_refuses_nonlinear_strategies(tmp_path):
    from fedlora.config import RunConfig, with_overrides
    from server.privacy import ServerPrivacy

    cfg = with_overrides(
        RunConfig(),
        {"privacy.mode": "client", "privacy.noise_multiplier": 1.0, "federation.strategy": "flexlora"},
    )
    with pytest.raises(ValueError, match="flexlora"):
        ServerPrivacy(cfg, tmp_path)
