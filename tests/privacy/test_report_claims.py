"""The report's headline and budget verdicts, checked against Opacus called directly."""

import json
import re

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.report import write_report
from fedlora.privacy.runfile import RunFacts, save_run_ledgers

DELTA = 1e-5
# client -> (sigma, q, steps per round, rounds): three clearly different epsilons.
PLANS = {
    "client-0": (1.1, 0.1, 10, [1, 2]),
    "client-1": (0.8, 0.2, 20, [1, 2, 3]),  # spends the most
    "client-2": (2.0, 0.05, 5, [2]),
}


def opacus_epsilon(history, accountant):
    # Opacus on the raw per-round history: independent of fedlora's merging and caching.
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    acc.history = list(history)
    if accountant == "prv":
        return acc.get_epsilon(delta=DELTA, eps_error=0.01)
    return acc.get_epsilon(delta=DELTA)


def histories():
    return {cid: [(s, q, n)] * len(rounds) for cid, (s, q, n, rounds) in PLANS.items()}


def write_run(run_dir, accountant, target):
    ledgers = {}
    for cid, (sigma, q, steps, rounds) in PLANS.items():
        ledger = PrivacyLedger(cid, "record", DELTA, 1.0)
        for rnd in rounds:
            ledger = ledger.record(rnd, sigma, q, steps, "poisson")
        ledgers[cid] = ledger
    facts = RunFacts.create("record", accountant=accountant, target_epsilon=target, delta=DELTA)
    save_run_ledgers(run_dir, ledgers, facts)
    return write_report(run_dir, with_prv=accountant == "prv")


def headline_epsilon(text):
    m = re.search(r"protected by \(([0-9.]+|inf), ([0-9.e-]+)\)-differential privacy", text)
    assert m, text
    return m.group(1), float(m.group(2))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_headline_is_the_largest_epsilon_over_all_ledgers(tmp_path, accountant):
    paths = write_run(tmp_path, accountant, target=None)
    report = json.loads(paths["json"].read_text())
    eps = {cid: opacus_epsilon(h, accountant) for cid, h in histories().items()}
    assert max(eps, key=eps.get) == "client-1" and len({round(e, 4) for e in eps.values()}) == 3
    assert headline_epsilon(report["guarantee"]) == (f"{eps['client-1']:.4f}", DELTA)
    assert "largest ε over 3 ledger(s)" in report["guarantee"]
    for key in ("md", "html"):
        assert report["guarantee"] in paths[key].read_text().replace("&#x27;", "'")
    for row in report["clients"]:
        assert row[f"epsilon_{accountant}"] == pytest.approx(eps[row["client_id"]], rel=1e-6)


def test_a_client_over_budget_is_flagged_and_the_headline_does_not_hide_it(tmp_path):
    eps = {cid: opacus_epsilon(h, "rdp") for cid, h in histories().items()}
    # A target between the two smaller epsilons and the largest: exactly client-1 is over it.
    target = (eps["client-1"] + max(eps["client-0"], eps["client-2"])) / 2
    paths = write_run(tmp_path, "rdp", target=target)
    report = json.loads(paths["json"].read_text())
    verdicts = {c["client_id"]: c["within_budget"] for c in report["clients"]}
    assert verdicts == {"client-0": True, "client-1": False, "client-2": True}
    # The headline states the spent epsilon (above the target), not the target.
    assert float(headline_epsilon(report["guarantee"])[0]) == pytest.approx(eps["client-1"], abs=1e-4)
    assert float(headline_epsilon(report["guarantee"])[0]) > target
    md = paths["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| client-1 "))
    assert row.rstrip(" |").endswith("NO")
    assert sum(line.rstrip(" |").endswith("yes") for line in md.splitlines() if "| client-" in line) == 2
