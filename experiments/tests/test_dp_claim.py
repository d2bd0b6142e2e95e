"""experiments.dp_claim: steadiness math by hand, and a chunked quick run that resumes."""

from __future__ import annotations

import json

import pytest

from experiments.dp_claim import RUNS_FILE, compare, is_monotone, main, paired, steadiness


def test_steadiness_by_hand():
    s = steadiness([[0.2, 0.5, 0.4, 0.6], [0.2, 0.3, 0.6, 0.7]])
    assert s["largest_drop"] == pytest.approx([0.1, 0.0])
    # sample std of two values a, b is |a - b| / sqrt(2)
    assert s["std_per_round"] == pytest.approx([0.0, 0.2 / 2**0.5, 0.2 / 2**0.5, 0.1 / 2**0.5])
    assert s["spread"] == pytest.approx((0.5 / 2**0.5) / 3)  # rounds 1..3 only
    assert (s["monotone"], s["seeds"]) == (1, 2)
    one = steadiness([[0.25, 0.3]])
    assert one["std_per_round"] == [0.0, 0.0] and one["monotone"] == 1


def test_is_monotone_counts_equal_rounds_as_steady():
    assert is_monotone([0.2, 0.2, 0.5]) and not is_monotone([0.2, 0.5, 0.49])


def test_compare_needs_all_three_criteria():
    steady = steadiness([[0.2, 0.5, 0.6], [0.2, 0.4, 0.6]])  # no drop, spread (0.0707 + 0) / 2
    shaky = steadiness([[0.2, 0.6, 0.5], [0.2, 0.3, 0.7]])  # drop 0.1, spread (0.2121 + 0.1414) / 2
    assert compare(steady, shaky) == {
        "smaller_largest_drop": True,
        "smaller_spread": True,
        "monotone": True,
        "all": True,
    }
    assert compare(shaky, steady) == {
        "smaller_largest_drop": False,
        "smaller_spread": False,
        "monotone": False,
        "all": False,
    }
    # equal curves: neither drops (criterion met), but the spread is not smaller
    assert compare(steady, steady) == {
        "smaller_largest_drop": True,
        "smaller_spread": False,
        "monotone": True,
        "all": False,
    }


def test_paired_differences_by_seed():
    runs = [
        {"strategy": "ffa", "seed": 0, "accuracy": [0.2, 0.6, 0.9], "loss": [1.4, 0.9, 0.3]},
        {"strategy": "fedit", "seed": 0, "accuracy": [0.2, 0.7, 0.6], "loss": [1.4, 0.8, 0.5]},
        {"strategy": "ffa", "seed": 1, "accuracy": [0.2, 0.5, 0.8], "loss": [1.4, 1.0, 0.4]},
    ]
    (d,) = paired(runs, "ffa", "fedit")  # seed 1 has no FedIT run: not paired
    assert d["seed"] == 0
    assert d["final_accuracy"] == pytest.approx(0.3)
    assert d["final_loss"] == pytest.approx(-0.2)
    assert d["largest_drop"] == pytest.approx(-0.1)


def test_quick_chunks_resume_and_tabulate_every_run(tmp_path, capsys):
    assert main(["--quick", "--strategies", "ffa", "--out", str(tmp_path)]) == 0
    first = (tmp_path / RUNS_FILE).read_text().splitlines()
    assert [json.loads(line)["strategy"] for line in first] == ["ffa"]
    assert main(["--quick", "--resume", "--out", str(tmp_path)]) == 0  # runs only FedIT
    lines = (tmp_path / RUNS_FILE).read_text().splitlines()
    assert lines[0] == first[0] and [json.loads(line)["strategy"] for line in lines] == ["ffa", "fedit"]
    capsys.readouterr()
    assert main(["--quick", "--resume", "--out", str(tmp_path)]) == 0  # nothing left to run
    assert "seed 0: accuracy" not in capsys.readouterr().out
    assert (tmp_path / RUNS_FILE).read_text().splitlines() == lines
    data = json.loads((tmp_path / "dp_claim.json").read_text())
    ffa, fedit = (json.loads(line) for line in lines)
    assert ffa["aggregation_error"] == []  # FFA clients send only B: nothing to measure
    (err,) = fedit["aggregation_error"]  # one round; FedIT's cross-term error is positive
    assert err > 0 and fedit["epsilon"] > 0 and ffa["noise_multiplier"] == 1.0
    assert set(data["summary"]) == {"ffa", "fedit"} and data["paired"]["per_seed"][0]["seed"] == 0
    assert set(data["criteria"]) == {"smaller_largest_drop", "smaller_spread", "monotone", "all"}
    md = (tmp_path / "dp_claim.md").read_text()
    assert "paired (ffa minus fedit)" in md and md.count("| fedit |") == 2


def test_cli_refuses_unknown_strategy(capsys):
    with pytest.raises(SystemExit):
        main(["--quick", "--strategies", "fedavg"])
    assert "unknown strategies ['fedavg']; choose from ffa, fedit" in capsys.readouterr().err
