"""The arithmetic behind the scaling and plain-Flower benchmarks, on hand-made call records."""

from __future__ import annotations

import pytest

from experiments.baseline import composed_epsilon, epsilon_check, scenario
from experiments.baselines.metering import summarize

MIB = 2**20


def _call(kind: str, start: float, replies: int, down: int, up: int, rss_mib: int) -> dict:
    return {
        "type": kind,
        "start": start,
        "cpu_start": 1.5 * start,  # the tree spends 1.5 CPU seconds per wall second
        "end": start + 1.0,
        "messages": replies,
        "replies": replies,
        "errors": 0,
        "bytes_down": down,
        "bytes_up": up,
        "metrics": [],
        "rss_after": rss_mib * MIB,
    }


def test_summarize_rounds_bytes_and_memory_growth():
    calls = [
        _call("query", 2.0, 10, 0, 0, 900),
        _call("train", 5.0, 4, 400, 40, 1000),
        _call("train", 8.0, 4, 400, 40, 1040),
        _call("train", 12.0, 2, 200, 20, 1100),
    ]
    out = summarize(calls, t_start=0.0, t_end=20.0, peak_rss=1200 * MIB)
    assert out["rounds"] == 3
    assert out["round_seconds"] == [3.0, 4.0]  # between the starts of consecutive rounds
    assert out["seconds_per_round_min"] == 3.0 and out["seconds_per_round_median"] == 3.5
    assert out["round_cpu_seconds"] == [4.5, 6.0] and out["cpu_seconds_per_round_min"] == 4.5
    assert out["startup_seconds"] == 5.0  # up to the first train round; queries included
    assert out["bytes_per_round"] == [440, 440, 220]
    # 100 MiB more after round 3 than after round 1, over the 4 + 2 client-rounds in between
    assert out["rss_growth_per_client_round_mib"] == pytest.approx(100 / 6, abs=0.05)
    assert out["peak_rss_mib"] == 1200
    assert out["query_calls"] == [{"messages": 10, "seconds": 1.0}]


def test_summarize_refuses_a_run_without_training():
    with pytest.raises(RuntimeError, match="no train messages"):
        summarize([_call("query", 1.0, 3, 0, 0, 100)], 0.0, 2.0, 0)


def test_per_round_epsilon_understates_the_composition(tmp_path):
    cfg = scenario(True, tmp_path)
    sigma, delta, q = cfg.privacy.noise_multiplier, cfg.privacy.delta, 1 / 29
    one = composed_epsilon(sigma, q, 5, delta)
    # A fresh PrivacyEngine every round reports `one` each time; the client trained 3 rounds.
    rounds = [[{"node": 7, "dp-sample-rate": q, "steps": 5, "epsilon": one}] for _ in range(3)]
    check = epsilon_check(rounds, cfg, "epsilon")
    node = check["clients"]["7"]
    assert node["steps"] == 15 and node["rounds"] == 3
    assert node["true"] == pytest.approx(composed_epsilon(sigma, q, 15, delta))
    assert node["true"] > one * 1.1
    assert not check["never_below_truth"]
    # A ledger that reports the composition is never below the truth.
    honest = [[{**m, "epsilon": node["true"]} for m in r] for r in rounds]
    assert epsilon_check(honest, cfg, "epsilon")["never_below_truth"]
