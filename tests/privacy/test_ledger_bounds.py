"""A node's ledger cannot stall the server: bounded at the boundary, ε computed incrementally.

The attack: a valid 100-entry, 12 KB ledger (every entry its own σ) added 8 s to every round
(ε recomputed per ledger per round) and the final report did not finish in 300 s (one
accountant call per ledger prefix).
"""

import time
from pathlib import Path

import pytest
from flwr.app import ConfigRecord, RecordDict
from opacus.accountants import RDPAccountant

from fedlora.config import RunConfig, with_overrides
from fedlora.privacy.accounting import compute_epsilon, rdp_per_step, rdp_total
from fedlora.privacy.ledger import (
    MAX_PRV_TRAJECTORY_POINTS,
    MAX_RECEIVED_BLOCKS,
    MAX_RECEIVED_ENTRIES,
    LedgerError,
    PrivacyLedger,
    parse_received,
)
from server.privacy import MAX_NEW_ENTRIES_PER_REPLY, ServerPrivacy


class Reply:
    def __init__(self, ledger_text: str) -> None:
        self.content = RecordDict({"privacy": ConfigRecord({"ledger": ledger_text})})


def record_cfg() -> RunConfig:
    return with_overrides(
        RunConfig(),
        {"privacy.mode": "record", "privacy.noise_multiplier": 1.0, "privacy.accountant": "prv"},
    )


def ledger(entries: int, distinct: bool, run: str = "7") -> PrivacyLedger:
    led = PrivacyLedger("client-0", "record", 1e-5, 1.0)
    for r in range(1, entries + 1):
        led = led.record(r, 1.0 + (0.001 * r if distinct else 0.0), 0.2, 5, run=run)
    return led


def test_the_hundred_distinct_entry_ledger_is_refused_at_once(tmp_path: Path):
    priv = ServerPrivacy(record_cfg(), tmp_path)
    text = ledger(100, distinct=True).to_json()
    t0 = time.perf_counter()
    with pytest.raises(LedgerError, match="distinct"):
        priv.observe_reply(11, 0, Reply(text))
    assert time.perf_counter() - t0 < 2.0  # refused before any accountant runs
    assert "client-0" not in priv.ledgers


def test_received_ledgers_are_bounded_in_bytes_entries_and_pairs():
    with pytest.raises(LedgerError, match="bytes"):
        parse_received(" " * (1100 * 1024))
    with pytest.raises(LedgerError, match="entries"):
        parse_received(ledger(MAX_RECEIVED_ENTRIES + 1, distinct=False).to_json())
    assert (
        len(parse_received(ledger(MAX_RECEIVED_BLOCKS, distinct=True).to_json()).entries)
        == MAX_RECEIVED_BLOCKS
    )
    assert len(parse_received(ledger(500, distinct=False).to_json()).entries) == 500  # a long honest life


def test_after_its_first_report_a_node_adds_only_a_few_entries_per_reply(tmp_path: Path):
    priv = ServerPrivacy(record_cfg(), tmp_path)
    priv.observe_reply(11, 0, Reply(ledger(3, distinct=False).to_json()))
    priv.observe_reply(11, 0, Reply(ledger(4, distinct=False).to_json()))  # one more round: fine
    with pytest.raises(LedgerError, match="entries in one round"):
        priv.observe_reply(11, 0, Reply(ledger(4 + MAX_NEW_ENTRIES_PER_REPLY + 1, distinct=False).to_json()))


def test_cached_rdp_equals_opacus_and_the_golden_value():
    assert compute_epsilon([(1.5, 0.04, 2250)], 1e-5, "rdp") == pytest.approx(7.32911117143, abs=1e-9)
    hist = [(1.0 + 0.01 * r, 0.2, 5 + r) for r in range(6)]
    acc = RDPAccountant()
    acc.history = hist
    assert compute_epsilon(hist, 1e-5, "rdp") == pytest.approx(acc.get_epsilon(1e-5), rel=1e-12)
    assert (rdp_total([(1.0, 0.2, 7)]) == 7 * rdp_per_step(1.0, 0.2)).all()


def test_trajectories_are_incremental_and_bounded():
    led = ledger(40, distinct=False)
    rdp = led.epsilon_trajectory("rdp")
    assert [r for r, _ in rdp] == list(range(1, 41))
    for i in (0, 9, 39):
        assert rdp[i][1] == pytest.approx(compute_epsilon(led.history[: i + 1], 1e-5, "rdp"), rel=1e-12)
    prv = led.epsilon_trajectory("prv")
    assert len(prv) == MAX_PRV_TRAJECTORY_POINTS and prv[0][0] == 1 and prv[-1][0] == 40
    assert prv[-1][1] == pytest.approx(led.epsilon("prv"))


def test_the_live_epsilon_of_a_many_pair_ledger_is_the_fast_rdp_bound():
    small, big = ledger(3, distinct=True), ledger(12, distinct=True)
    assert small.live_epsilon("prv") == (small.epsilon("prv"), "prv")
    eps, used = big.live_epsilon("prv")
    assert used == "rdp" and eps == big.epsilon("rdp") >= big.epsilon("prv")
