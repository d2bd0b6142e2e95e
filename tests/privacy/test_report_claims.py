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


def replace_one_reference(history):
    # Independent of fedlora's grid: scipy's adaptive quadrature of the substitution pair
    # P = (1-q) N(0, s²) + q N(1, s²), Q = (1-q) N(0, s²) + q N(-1, s²), Opacus' RDP -> DP conversion.
    import math

    import numpy as np
    from opacus.accountants.analysis.rdp import get_privacy_spent
    from scipy import integrate

    orders = RDPAccountant.DEFAULT_ALPHAS
    total = np.zeros(len(orders))
    for sigma, q, steps in history:

        def log_mix(x, sign, sigma=sigma, q=q):
            def log_n(m):
                return -((x - m) ** 2) / (2 * sigma**2) - 0.5 * math.log(2 * math.pi * sigma**2)

            return float(np.logaddexp(math.log(1 - q) + log_n(0.0), math.log(q) + log_n(sign)))

        for i, a in enumerate(orders):
            if a > 64:  # the best order for these histories is far below; skip the costliest integrals
                total[i] = np.inf
                continue
            lo, hi = -12 * sigma - 2, 2 * a + 12 * sigma + 2

            def f(x, a=a):
                return a * log_mix(x, 1.0) + (1 - a) * log_mix(x, -1.0)

            top = max(f(x) for x in np.linspace(lo, hi, 4001))  # scale out the peak: no overflow
            val, _ = integrate.quad(lambda x, top=top, f=f: math.exp(f(x) - top), lo, hi, limit=400)
            total[i] += steps * (math.log(val) + top) / (a - 1)
    return get_privacy_spent(orders=orders, rdp=total, delta=DELTA)[0]


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
    # Record level: the headline is the replace-one ε (every reply discloses the data size), the
    # add/remove ε the clients budget with is named beside it.
    held = {cid: replace_one_reference(h) for cid, h in histories().items()}
    headline, delta = headline_epsilon(report["guarantee"])
    assert delta == DELTA and float(headline) == pytest.approx(held["client-1"], rel=1e-4)
    assert float(headline) > eps["client-1"]
    assert f"(largest {eps['client-1']:.4f})" in report["guarantee"]
    assert "ε over 3 ledger(s)" in report["guarantee"] and "replace-one" in report["guarantee"]
    for key in ("md", "html"):
        assert report["guarantee"] in paths[key].read_text().replace("&#x27;", "'")
    for row in report["clients"]:
        assert row[f"epsilon_{accountant}"] == pytest.approx(eps[row["client_id"]], rel=1e-6)
        assert row["epsilon_replace_one"] == pytest.approx(held[row["client_id"]], rel=1e-4)


def test_a_client_over_budget_is_flagged_and_the_headline_does_not_hide_it(tmp_path):
    eps = {cid: opacus_epsilon(h, "rdp") for cid, h in histories().items()}
    # A target between the two smaller epsilons and the largest: exactly client-1 is over it.
    target = (eps["client-1"] + max(eps["client-0"], eps["client-2"])) / 2
    paths = write_run(tmp_path, "rdp", target=target)
    report = json.loads(paths["json"].read_text())
    verdicts = {c["client_id"]: c["within_budget"] for c in report["clients"]}
    assert verdicts == {"client-0": True, "client-1": False, "client-2": True}
    # The headline states the spent epsilon (above the target), not the target.
    assert float(headline_epsilon(report["guarantee"])[0]) > eps["client-1"] > target
    md = paths["md"].read_text()
    row = next(line for line in md.splitlines() if line.startswith("| client-1 "))
    assert row.rstrip(" |").endswith("NO")
    assert sum(line.rstrip(" |").endswith("yes") for line in md.splitlines() if "| client-" in line) == 2
