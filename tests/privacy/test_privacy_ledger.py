"""Ledger: golden ε values, composition across rounds and restarts, JSON round trip."""

import itertools
import json
import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.privacy.accounting import compact_history, compute_epsilon
from fedlora.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger

DELTA = 1e-5


def make_ledger(*blocks, sampling="poisson", cid="c0"):
    ledger = PrivacyLedger(cid, "record", DELTA, 1.0)
    for rnd, (sigma, q, steps) in enumerate(blocks, start=1):
        ledger = ledger.record(rnd, sigma, q, steps, sampling)
    return ledger


def test_golden_rdp():
    assert make_ledger((1.5, 0.04, 2250)).epsilon("rdp") == pytest.approx(7.32911117143, abs=1e-10)


def test_golden_prv():
    # Opacus' documented value; the last digits depend on numpy/scipy builds (observed 6.7773957101).
    assert make_ledger((1.5, 0.04, 2249)).epsilon("prv") == pytest.approx(6.777395712150674, rel=1e-8)


def test_rounds_compose_like_one_block():
    split = make_ledger((1.5, 0.04, 1000), (1.5, 0.04, 750), (1.5, 0.04, 500))
    whole = make_ledger((1.5, 0.04, 2250))
    assert split.epsilon("rdp") == whole.epsilon("rdp")
    assert split.total_steps == 2250 and split.rounds == [1, 2, 3]
    # Opacus itself on the unmerged history agrees (RDP adds up linearly).
    acc = RDPAccountant()
    acc.history = [(1.5, 0.04, 1000), (1.5, 0.04, 750), (1.5, 0.04, 500)]
    assert split.epsilon("rdp") == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)


def opacus_prv(history):
    # Opacus itself on the raw, unmerged history: independent of compact_history.
    acc = PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=DELTA, eps_error=0.01)


def test_rounds_compose_like_one_block_prv():
    split = make_ledger((1.2, 0.1, 10), (1.2, 0.1, 20))
    assert split.epsilon("prv") == make_ledger((1.2, 0.1, 30)).epsilon("prv")
    # The equality above holds by construction (blocks are merged); check against Opacus unmerged.
    assert split.epsilon("prv") == pytest.approx(opacus_prv([(1.2, 0.1, 10), (1.2, 0.1, 20)]), rel=1e-6)
    assert split.epsilon("prv") == pytest.approx(2.9663362970969183, rel=1e-8)


def test_heterogeneous_history_is_order_free_and_grows():
    a = make_ledger((1.0, 0.05, 100), (2.0, 0.05, 300), (1.0, 0.05, 50))
    b = make_ledger((2.0, 0.05, 300), (1.0, 0.05, 150))
    assert a.epsilon() == b.epsilon()
    hist = [(1.0, 0.05, 100), (2.0, 0.05, 300), (1.0, 0.05, 50)]
    acc = RDPAccountant()
    acc.history = list(hist)
    assert a.epsilon() == pytest.approx(acc.get_epsilon(DELTA), rel=1e-12)
    assert a.epsilon("prv") == pytest.approx(opacus_prv(hist), rel=1e-6)
    assert a.epsilon() > make_ledger((1.0, 0.05, 150)).epsilon()
    assert compact_history(a.history) == ((1.0, 0.05, 150), (2.0, 0.05, 300))


def test_trajectory_is_prefix_epsilon_and_monotone():
    ledger = make_ledger((1.1, 0.05, 40), (1.1, 0.05, 40), (0.9, 0.05, 40), (1.1, 0.05, 0))
    traj = ledger.epsilon_trajectory("rdp")
    assert [r for r, _ in traj] == [1, 2, 3, 4]
    eps = [e for _, e in traj]
    assert all(x <= y for x, y in itertools.pairwise(eps))
    assert eps[-1] == ledger.epsilon() and eps[-1] == eps[-2]  # a zero-step round spends nothing
    assert eps[0] == make_ledger((1.1, 0.05, 40)).epsilon()


def test_restart_save_load_append_equals_uninterrupted(tmp_path):
    uninterrupted = make_ledger((1.3, 0.02, 200), (1.3, 0.02, 200), (1.3, 0.02, 200))
    first = make_ledger((1.3, 0.02, 200), (1.3, 0.02, 200))
    path = first.save(tmp_path / "client" / "ledger.json")
    resumed = PrivacyLedger.load(path).record(3, 1.3, 0.02, 200)
    assert resumed == uninterrupted
    assert resumed.epsilon("rdp") == uninterrupted.epsilon("rdp")
    assert [p.name for p in path.parent.iterdir()] == ["ledger.json"]  # no temp file left behind


def test_json_round_trip():
    ledger = make_ledger((1.3, 0.02, 200), (0.7, 0.5, 3), sampling="fixed")
    assert PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict()))) == ledger
    assert PrivacyLedger.from_json(ledger.to_json()) == ledger
    assert ledger.to_dict()["entries"][0] == {
        "round": 1,
        "noise_multiplier": 1.3,
        "sample_rate": 0.02,
        "steps": 200,
        "sampling": "fixed",
    }


def test_fixed_size_sampling_claims_no_amplification():
    fixed = make_ledger((1.0, 0.01, 100), sampling="fixed")
    assert fixed.history == [(1.0, 1.0, 100)]
    assert fixed.epsilon() == make_ledger((1.0, 1.0, 100)).epsilon()
    assert fixed.epsilon() > make_ledger((1.0, 0.01, 100)).epsilon()


def test_edge_values():
    assert PrivacyLedger("c", "record", DELTA, 1.0).epsilon("prv") == 0.0
    assert math.isinf(make_ledger((0.0, 0.1, 5)).epsilon())
    assert make_ledger((0.0, 0.1, 0)).epsilon() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"round": -1}, "round=-1"),
        ({"noise_multiplier": -0.5}, "noise_multiplier=-0.5"),
        ({"sample_rate": 0.0}, "sample_rate=0.0"),
        ({"sample_rate": 1.5}, "sample_rate=1.5"),
        ({"steps": 2.5}, "steps=2.5"),
        ({"sampling": "shuffle"}, "sampling='shuffle'"),
    ],
)
def test_bad_entries_name_the_value(kwargs, needle):
    args = {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3, **kwargs}
    with pytest.raises(LedgerError, match=needle.replace("(", r"\(")):
        LedgerEntry(**args)


def test_ledger_invariants():
    ledger = make_ledger((1.0, 0.1, 3), (1.0, 0.1, 3))
    with pytest.raises(LedgerError, match="round 2 follows round 2"):
        ledger.record(2, 1.0, 0.1, 3)
    with pytest.raises(LedgerError, match="unit='example'"):
        PrivacyLedger("c", "example", DELTA, 1.0)
    with pytest.raises(LedgerError, match="delta=0"):
        PrivacyLedger("c", "record", 0, 1.0)
    with pytest.raises(LedgerError, match="max_grad_norm=0"):
        PrivacyLedger("c", "record", DELTA, 0.0)
    with pytest.raises(LedgerError, match="format"):
        PrivacyLedger.from_dict({**ledger.to_dict(), "format": "other/9"})
    with pytest.raises(ValueError, match="accountant='gdp'"):
        ledger.epsilon("gdp")


def test_compute_epsilon_is_whole_history():
    hist = [(1.0, 0.05, 100), (1.0, 0.05, 100)]
    assert compute_epsilon(hist, DELTA) > compute_epsilon(hist[:1], DELTA)
