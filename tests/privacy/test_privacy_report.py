"""Run-level ledger file and the privacy report in Markdown, JSON and HTML."""

import json
import re

import pytest

from fedlora.privacy.accounting import compute_epsilon
from fedlora.privacy.ledger import LedgerError, PrivacyLedger
from fedlora.privacy.report import load_report, write_report
from fedlora.privacy.report_render import format_epsilon
from fedlora.privacy.runfile import (
    CLIENT_LEVEL_KEY,
    RunFacts,
    ledger_path,
    load_run_ledgers,
    save_run_ledgers,
)

DELTA = 1e-5


def record_run(run_dir, sampling="poisson"):
    ledgers = {}
    plans = {"client-0": (0.1, 10, [1, 2, 3]), "client-1": (0.1, 10, [1, 3]), "client-2": (1.0, 2, [2])}
    for cid, (q, steps, rounds) in plans.items():
        ledger = PrivacyLedger(cid, "record", DELTA, 1.0)
        for rnd in rounds:
            ledger = ledger.record(rnd, 1.1, q, steps, sampling)
        ledgers[cid] = ledger
    facts = RunFacts.create("record", sampling=sampling, target_epsilon=8.0, delta=DELTA, strategy="fedit")
    save_run_ledgers(run_dir, ledgers, facts)
    return ledgers


def test_run_file_round_trip(tmp_path):
    ledgers = record_run(tmp_path)
    loaded, facts = load_run_ledgers(tmp_path)
    assert loaded == ledgers
    assert facts.mode == "record" and facts.unit == "record" and facts.amplification_assumed
    assert (
        facts.secure_rng is True
        and "256 bits" in facts.secure_rng_reason
        and "discrete Gaussian" in facts.secure_rng_reason
    )
    assert facts.library_versions["opacus"] == "1.6.0"
    doc = json.loads(ledger_path(tmp_path).read_text())
    assert doc["format"] == "fedlora.privacy-run/1" and sorted(doc["ledgers"]) == sorted(ledgers)


def test_run_file_rejects_inconsistent_ledgers(tmp_path):
    ledger = PrivacyLedger("a", "record", DELTA, 1.0)
    with pytest.raises(LedgerError, match="stored under 'b'"):
        save_run_ledgers(tmp_path, {"b": ledger}, RunFacts.create("record"))
    with pytest.raises(LedgerError, match="mode is 'client'"):
        save_run_ledgers(tmp_path, {"a": ledger}, RunFacts.create("client"))
    with pytest.raises(ValueError, match="mode='local'"):
        RunFacts.create("local")


def test_record_report_lists_every_client(tmp_path):
    ledgers = record_run(tmp_path)
    paths = write_report(tmp_path)
    md, html = paths["md"].read_text(), paths["html"].read_text()
    report = load_report(tmp_path)
    assert report["formal_guarantee"] is True
    for cid, ledger in ledgers.items():
        rdp, prv = format_epsilon(ledger.epsilon("rdp")), format_epsilon(ledger.epsilon("prv"))
        for text in (md, html):
            assert cid in text and rdp in text and prv in text
        row = next(c for c in report["clients"] if c["client_id"] == cid)
        assert row["epsilon_rdp"] == pytest.approx(ledger.epsilon("rdp"))
        assert row["epsilon_prv"] == pytest.approx(ledger.epsilon("prv"))
        assert [r for r, _ in row["trajectory"]] == ledger.rounds
        assert row["total_steps"] == ledger.total_steps and row["within_budget"] is True
    for needle in (
        "no training loss",
        "example count",
        "Hyper-parameter",
        "base model",
        "ChaCha20",
        "replace-one",
        "Timing",
    ):
        assert needle in md and needle in html


def test_html_is_self_contained(tmp_path):
    record_run(tmp_path)
    html = write_report(tmp_path, with_prv=False)["html"].read_text()
    assert html.count('src="data:image/png;base64,') == 1
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", html)
    assert "<script" not in html and "<link" not in html and "@import" not in html


def test_fixed_sampling_is_reported_without_amplification(tmp_path):
    record_run(tmp_path, sampling="fixed")
    paths = write_report(tmp_path, with_prv=False)
    report = json.loads(paths["json"].read_text())
    assert report["facts"]["amplification_assumed"] is False
    assert any("no amplification" in s for s in report["not_covered"])


def test_client_level_report(tmp_path):
    ledger = PrivacyLedger(CLIENT_LEVEL_KEY, "client", DELTA, 0.5)
    for rnd in range(1, 6):
        ledger = ledger.record(rnd, 1.0, 0.5, 1)
    save_run_ledgers(tmp_path, {CLIENT_LEVEL_KEY: ledger}, RunFacts.create("client", delta=DELTA))
    paths = write_report(tmp_path, with_prv=False)
    md = paths["md"].read_text()
    assert format_epsilon(ledger.epsilon("rdp")) in md and "DP-FedAvg" in md
    assert "n/a (not requested)" in md
    assert "NOT against the server" in md and "but not against the server" in md


@pytest.mark.parametrize("explicit", [True, False])
def test_no_dp_run_says_no_guarantee(tmp_path, explicit):
    if explicit:
        save_run_ledgers(tmp_path, {}, RunFacts.create("none"))
    paths = write_report(tmp_path)
    for key in ("md", "html"):
        text = paths[key].read_text()
        assert "No formal guarantee" in text and "No differential privacy was applied" in text
    report = json.loads(paths["json"].read_text())
    assert report["formal_guarantee"] is False and report["clients"] == []
    assert "data:image/png" not in paths["html"].read_text()


def test_infinite_epsilon_is_valid_json(tmp_path):
    ledger = PrivacyLedger("c", "record", DELTA, 1.0).record(1, 0.0, 0.1, 3)
    save_run_ledgers(tmp_path, {"c": ledger}, RunFacts.create("record"))
    paths = write_report(tmp_path, with_prv=False)
    report = json.loads(paths["json"].read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
    assert report["clients"][0]["epsilon_rdp"] == "inf"
    assert "| inf |" in paths["md"].read_text()


def test_one_accountant_runs_through_the_report_and_the_other_is_a_labelled_comparison(tmp_path):
    ledger = PrivacyLedger("client-0", "record", DELTA, 1.0)
    for rnd in (1, 2, 3):
        ledger = ledger.record(rnd, 1.1, 0.1, 10)
    facts = RunFacts.create("record", accountant="prv", target_epsilon=8.0, delta=DELTA)
    save_run_ledgers(tmp_path, {"client-0": ledger}, facts)
    paths = write_report(tmp_path)
    report, md = load_report(tmp_path), paths["md"].read_text()
    (row,) = report["clients"]
    assert report["accountant"] == row["accountant"] == "prv"
    # The trajectory (table and plot) is PRV, ending at the headline's PRV ε; RDP is only a comparison.
    assert row["trajectory"][-1][1] == pytest.approx(row["epsilon_prv"]) == pytest.approx(row["epsilon"])
    assert row["trajectory"][0][1] == pytest.approx(compute_epsilon([(1.1, 0.1, 10)], DELTA, "prv"))
    assert format_epsilon(row["epsilon_prv"]) in report["guarantee"]
    assert "## ε after each round (PRV)" in md and "ε (RDP, comparison)" in md


def test_each_ledger_is_judged_against_its_own_target(tmp_path):
    strict = PrivacyLedger("client-0", "record", DELTA, 1.0, target_epsilon=1.0).record(1, 1.1, 0.1, 50)
    loose = PrivacyLedger("client-1", "record", DELTA, 1.0).record(1, 1.1, 0.1, 50)
    facts = RunFacts.create("record", target_epsilon=8.0, delta=DELTA)
    save_run_ledgers(tmp_path, {"client-0": strict, "client-1": loose}, facts)
    md = write_report(tmp_path, with_prv=False)["md"].read_text()
    rows = {c["client_id"]: c for c in load_report(tmp_path)["clients"]}
    assert 1.0 < strict.epsilon("rdp") < 8.0
    assert rows["client-0"]["target_epsilon"] == 1.0 and rows["client-0"]["within_budget"] is False
    assert rows["client-1"]["target_epsilon"] == 8.0 and rows["client-1"]["within_budget"] is True
    assert "1 (node)" in md


def test_the_report_says_the_run_was_resumed_and_how_often(tmp_path):
    ledger = PrivacyLedger("client-0", "record", DELTA, 1.0).record(1, 1.1, 0.1, 10)
    resumes = [{"after_round": 1, "charged": 2}, {"after_round": 3, "charged": 0}]
    save_run_ledgers(tmp_path, {"client-0": ledger}, RunFacts.create("record"), resumes=resumes)
    md = write_report(tmp_path, with_prv=False)["md"].read_text()
    assert "resumed 2 time(s); 2 round(s) in flight" in md
    assert load_report(tmp_path)["resumes"] == resumes
