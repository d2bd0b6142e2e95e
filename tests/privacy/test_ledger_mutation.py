"""Ledger contract, value by value: the checks that make mutation testing kill ledger mutants.

Each test pins one documented behaviour of :mod:`fedlora.privacy.ledger` with hand-built
ledgers (no accountant calls unless ε itself is the point), so they run in milliseconds.
"""

import pytest

from fedlora.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger

DELTA = 1e-5


def ledger(*entries: LedgerEntry, cid: str = "c0", **kw) -> PrivacyLedger:
    return PrivacyLedger(cid, "record", DELTA, 1.0, entries, **kw)


def test_union_adds_only_missing_keys_and_keeps_self_authoritative():
    mine = ledger(LedgerEntry(1, 1.0, 0.1, 5, run="r1"), LedgerEntry(2, 1.0, 0.1, 5, run="r1"))
    theirs = ledger(LedgerEntry(2, 9.0, 0.9, 9, run="r1"), LedgerEntry(3, 2.0, 0.2, 7, run="r1"))
    merged = mine.union(theirs)
    assert [(e.round, e.noise_multiplier, e.steps) for e in merged.entries] == [
        (1, 1.0, 5),
        (2, 1.0, 5),
        (3, 2.0, 7),
    ]


def test_union_orders_runs_by_first_appearance_and_rounds_within_a_run():
    mine = ledger(LedgerEntry(2, 1.0, 0.1, 1, run="b"))
    theirs = ledger(LedgerEntry(1, 1.0, 0.1, 1, run="a"), LedgerEntry(1, 1.0, 0.1, 1, run="b"))
    assert [e.key for e in mine.union(theirs).entries] == [("b", 1), ("b", 2), ("a", 1)]


def test_union_replaces_a_pending_charge_only_with_a_confirmed_entry():
    pending = LedgerEntry(1, 0.5, 1.0, 9, run="r", pending=True)
    confirmed = LedgerEntry(1, 1.0, 0.1, 3, run="r")
    other_pending = LedgerEntry(1, 0.7, 1.0, 8, run="r", pending=True)
    assert ledger(pending).union(ledger(confirmed)).entries == (confirmed,)
    assert ledger(confirmed).union(ledger(pending)).entries == (confirmed,)
    assert ledger(pending).union(ledger(other_pending)).entries == (pending,)


def test_union_keeps_self_metadata_and_refuses_another_party_or_unit():
    mine = PrivacyLedger("c0", "record", DELTA, 1.0, (), target_epsilon=3.0, complete=True)
    theirs = PrivacyLedger("c0", "record", 1e-3, 2.0, (LedgerEntry(1, 1.0, 0.1, 1),), target_epsilon=8.0)
    merged = mine.union(theirs)
    assert (merged.delta, merged.max_grad_norm, merged.target_epsilon, merged.complete) == (
        DELTA,
        1.0,
        3.0,
        True,
    )
    with pytest.raises(
        LedgerError, match=r"cannot merge the record ledger of 'c1' into the record ledger of 'c0'"
    ):
        mine.union(PrivacyLedger("c1", "record", DELTA, 1.0))
    with pytest.raises(LedgerError, match=r"cannot merge the client ledger of 'c0' into the record ledger"):
        mine.union(PrivacyLedger("c0", "client", DELTA, 1.0))


def test_next_round_is_wanted_or_one_past_the_last_label_of_any_run():
    assert ledger().next_round("r", 5) == 5
    two = ledger(LedgerEntry(1, 1.0, 0.1, 1, run="a"), LedgerEntry(3, 1.0, 0.1, 1, run="b"))
    assert two.next_round("a", 2) == 4
    assert two.next_round("a", 4) == 4
    assert two.next_round("a", 9) == 9
    assert isinstance(ledger().next_round("r", 5.0), int)


def test_without_pending_and_pending_rounds():
    keep = LedgerEntry(1, 1.0, 0.1, 1, run="r")
    drop = LedgerEntry(2, 1.0, 1.0, 4, run="r", pending=True)
    both = ledger(keep, drop, target_epsilon=2.0)
    assert both.pending_rounds == [("r", 2)]
    stripped = both.without_pending()
    assert stripped.entries == (keep,) and stripped.pending_rounds == []
    assert stripped.target_epsilon == 2.0 and both.entries == (keep, drop)


def test_entry_defaults_key_and_accounted_rate():
    e = LedgerEntry(4, 1.5, 0.25, 6)
    assert (e.sampling, e.run, e.pending) == ("poisson", "", False)
    assert e.key == ("", 4) and isinstance(e.key[1], int)
    assert e.accounted_sample_rate == 0.25 and e.block() == (1.5, 0.25, 6)
    fixed = LedgerEntry(4, 1.5, 0.25, 6, sampling="fixed", run="x")
    assert fixed.accounted_sample_rate == 1.0 and fixed.block() == (1.5, 1.0, 6) and fixed.key == ("x", 4)
    assert LedgerEntry(0, 0.0, 1.0, 0).round == 0  # round 0, σ 0, q 1 and 0 steps are all valid


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"round": True}, "round=True must be a non-negative integer"),
        ({"round": 1.5}, "round=1.5 must be a non-negative integer"),
        ({"round": -1}, "round=-1 must be a non-negative integer"),
        ({"round": 7, "noise_multiplier": -1.0}, "round 7: noise_multiplier=-1.0"),
        ({"sampling": "uniform"}, r"sampling='uniform' must be one of \['poisson', 'fixed'\]"),
        ({"run": 3}, "run=3 must be a string"),
    ],
)
def test_entry_validation_names_field_and_value(kwargs, needle):
    args = {"round": 1, "noise_multiplier": 1.0, "sample_rate": 0.1, "steps": 3, **kwargs}
    with pytest.raises(LedgerError, match=needle):
        LedgerEntry(**args)


def test_entry_to_dict_and_from_dict_exact():
    plain = LedgerEntry(2, 1, 1, 3)
    assert plain.to_dict() == {
        "round": 2,
        "noise_multiplier": 1.0,
        "sample_rate": 1.0,
        "steps": 3,
        "sampling": "poisson",
    }
    assert (
        type(plain.to_dict()["noise_multiplier"]) is float and type(plain.to_dict()["sample_rate"]) is float
    )
    full = LedgerEntry(2, 1.0, 0.5, 3, sampling="fixed", run="r9", pending=True)
    assert full.to_dict() == {
        "round": 2,
        "noise_multiplier": 1.0,
        "sample_rate": 0.5,
        "steps": 3,
        "sampling": "fixed",
        "run": "r9",
        "pending": True,
    }
    assert LedgerEntry.from_dict(full.to_dict()) == full
    assert (
        LedgerEntry.from_dict({"round": "2", "noise_multiplier": "1", "sample_rate": 1, "steps": 3.0})
        == plain
    )


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ([1, 2], "ledger entry must be an object, got list"),
        ({"round": 1, "steps": 2}, r"lacks \['noise_multiplier', 'sample_rate'\]"),
        (
            {"round": "one", "noise_multiplier": 1, "sample_rate": 0.1, "steps": 1},
            "is invalid: invalid literal",
        ),
        (
            {"round": float("inf"), "noise_multiplier": 1, "sample_rate": 0.1, "steps": 1},
            "is invalid: cannot convert",
        ),
        ({"round": None, "noise_multiplier": 1, "sample_rate": 0.1, "steps": 1}, "is invalid: int"),
    ],
)
def test_entry_from_dict_raises_only_ledger_errors(data, needle):
    with pytest.raises(LedgerError, match=needle):
        LedgerEntry.from_dict(data)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"unit": "user"}, r"unit='user' must be one of \['record', 'client'\]"),
        ({"delta": 1.0}, "delta=1.0 must lie in"),
        ({"max_grad_norm": 0.0}, "max_grad_norm=0.0 must be a finite number > 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm=-1.0"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm=inf"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm=nan"),
        ({"target_epsilon": 0.0}, "target_epsilon=0.0 must be a finite number > 0 or None"),
        ({"target_epsilon": float("inf")}, "target_epsilon=inf"),
        ({"target_epsilon": -2.0}, "target_epsilon=-2.0"),
    ],
)
def test_ledger_validation_names_field_and_value(kwargs, needle):
    args = {"client_id": "c0", "unit": "record", "delta": DELTA, "max_grad_norm": 1.0, **kwargs}
    with pytest.raises(LedgerError, match=needle):
        PrivacyLedger(**args)


def test_ledger_accepts_valid_metadata_and_stores_entries_as_a_tuple():
    entries = [LedgerEntry(1, 1.0, 0.1, 1)]
    led = PrivacyLedger("c0", "client", 0.5, 1e-9, entries, target_epsilon=1e-9)
    assert led.entries == tuple(entries) and isinstance(led.entries, tuple)
    assert (led.unit, led.target_epsilon, led.complete) == ("client", 1e-9, False)


def test_rounds_strictly_increase_within_a_run_but_runs_are_independent():
    a1, a2 = LedgerEntry(1, 1.0, 0.1, 1, run="a"), LedgerEntry(2, 1.0, 0.1, 1, run="a")
    b1 = LedgerEntry(1, 1.0, 0.1, 1, run="b")
    assert ledger(a1, a2, b1).rounds == [1, 2, 1]
    with pytest.raises(
        LedgerError,
        match=r"^ledger of 'c0': round 1 follows round 2 in run 'a'; rounds must strictly increase within a "
        r"run \(record each round once, after its update is released\)$",
    ):
        ledger(a2, b1, a1)
    with pytest.raises(LedgerError, match="round 2 follows round 2 in run 'a'"):
        ledger(a1, a2).append(a2)


def test_append_and_record_return_new_ledgers_with_every_field():
    base = ledger()
    grown = base.record(3, 1.25, 0.5, 7, "fixed", "r2")
    assert base.entries == () and grown.entries == (LedgerEntry(3, 1.25, 0.5, 7, "fixed", "r2"),)
    assert grown.append(LedgerEntry(4, 1.0, 0.1, 1, run="r2")).rounds == [3, 4]


def test_history_rounds_and_total_steps():
    led = ledger(LedgerEntry(1, 1.0, 0.1, 5), LedgerEntry(2, 2.0, 0.2, 7, sampling="fixed"))
    assert led.history == [(1.0, 0.1, 5), (2.0, 1.0, 7)]
    assert led.rounds == [1, 2] and led.total_steps == 12


def test_epsilon_uses_the_ledger_delta_unless_given_one():
    from fedlora.privacy.accounting import compute_epsilon

    led = ledger(LedgerEntry(1, 1.0, 0.1, 50))
    assert led.epsilon() == compute_epsilon([(1.0, 0.1, 50)], DELTA, "rdp")
    assert led.epsilon(delta=1e-3) == compute_epsilon([(1.0, 0.1, 50)], 1e-3, "rdp")
    assert led.epsilon(delta=1e-3) < led.epsilon()


def test_epsilon_trajectory_checks_the_accountant_even_when_empty():
    with pytest.raises(ValueError, match="accountant='gdp'"):
        ledger().epsilon_trajectory("gdp")
    assert ledger().epsilon_trajectory() == []


def test_ledger_to_dict_exact_and_optional_fields():
    bare = PrivacyLedger("c0", "record", DELTA, 2)
    assert bare.to_dict() == {
        "format": "fedlora.privacy-ledger/1",
        "client_id": "c0",
        "unit": "record",
        "delta": DELTA,
        "max_grad_norm": 2.0,
        "entries": [],
    }
    assert type(bare.to_dict()["max_grad_norm"]) is float
    full = PrivacyLedger(
        "c0", "client", DELTA, 1.0, (LedgerEntry(1, 1.0, 0.1, 1),), target_epsilon=4, complete=True
    )
    d = full.to_dict()
    assert d["target_epsilon"] == 4.0 and type(d["target_epsilon"]) is float and d["complete"] is True
    assert d["entries"] == [LedgerEntry(1, 1.0, 0.1, 1).to_dict()]
    assert PrivacyLedger.from_dict(d) == full


def test_ledger_from_dict_defaults():
    led = PrivacyLedger.from_dict({"client_id": 7, "unit": "record", "delta": "1e-5", "max_grad_norm": 1})
    assert led == PrivacyLedger("7", "record", 1e-5, 1.0)
    assert led.target_epsilon is None and led.complete is False and led.entries == ()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ("text", "a ledger must be a JSON object, got str"),
        (
            {"format": "x/1"},
            r"ledger format 'x/1' is not 'fedlora.privacy-ledger/1'; was it written by another",
        ),
        ({"client_id": "c", "unit": "record"}, r"ledger dict lacks \['delta', 'max_grad_norm'\]"),
        (
            {"client_id": "c", "unit": "record", "delta": 0.1, "max_grad_norm": 1, "entries": {}},
            "ledger entries must be a list, got dict",
        ),
        (
            {"client_id": "c", "unit": "record", "delta": "small", "max_grad_norm": 1},
            "ledger of 'c' is invalid: could not convert",
        ),
        (
            {"client_id": "c", "unit": "record", "delta": 0.1, "max_grad_norm": 1, "target_epsilon": "big"},
            "ledger of 'c' is invalid",
        ),
        (
            {"client_id": "c", "unit": "record", "delta": 0.1, "max_grad_norm": 1, "entries": [{"round": 1}]},
            r"^ledger entry \{'round': 1\} lacks",
        ),
    ],
)
def test_ledger_from_dict_raises_only_ledger_errors(data, needle):
    with pytest.raises(LedgerError, match=needle):
        PrivacyLedger.from_dict(data)


def test_json_text_is_sorted_and_bad_json_is_a_ledger_error():
    import json

    led = ledger(LedgerEntry(1, 1.0, 0.1, 1))
    assert led.to_json() == json.dumps(led.to_dict(), sort_keys=True)
    assert led.to_json().startswith('{"client_id": "c0", "delta"')
    assert PrivacyLedger.from_json(led.to_json()) == led
    with pytest.raises(LedgerError, match="ledger is not valid JSON"):
        PrivacyLedger.from_json("{")
    with pytest.raises(LedgerError, match="ledger is not valid JSON"):
        PrivacyLedger.from_json(None)


def test_save_writes_indented_sorted_json_and_load_reads_it(tmp_path):
    import json

    from fedlora.privacy.ledger import write_json_atomic

    led = ledger(LedgerEntry(1, 1.0, 0.1, 1), target_epsilon=2.0)
    path = led.save(tmp_path / "l.json")
    assert path == tmp_path / "l.json"
    assert path.read_text(encoding="utf-8") == json.dumps(led.to_dict(), indent=2, sort_keys=True) + "\n"
    assert PrivacyLedger.load(path) == led
    out = write_json_atomic(tmp_path / "n.json", {"b": float("nan"), "a": 1})
    assert out.read_text(encoding="utf-8") == '{\n  "a": 1,\n  "b": NaN\n}\n'


def test_epsilon_trajectory_uses_the_requested_accountant():
    led = ledger(LedgerEntry(1, 1.0, 0.1, 20))
    assert led.epsilon_trajectory("prv") == [(1, led.epsilon("prv"))]
    assert led.epsilon_trajectory("prv")[0][1] < led.epsilon_trajectory()[0][1]  # PRV is tighter than RDP
