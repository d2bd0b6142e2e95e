"""Privacy-budget report of a run: per client, what ε was spent, how, and what it does not cover.

:func:`write_report` reads ``<run_dir>/privacy/ledger.json`` (:mod:`fedlora.privacy.runfile`)
and writes ``privacy_report.md``, ``privacy_report.html`` (one self-contained page: inline
CSS, the plot as a base64 PNG data URI) and ``privacy_report.json`` into ``run_dir``.

Every ε is recomputed from the whole ledger: the trajectory with Opacus' RDP accountant
(Mironov 2017) after each round, the final value with both RDP and PRV (Gopi et al. 2021).
The mechanisms are DP-SGD (Abadi et al. 2016) for record-level and DP-FedAvg (McMahan
et al. 2018) for client-level privacy. A run without DP still gets a report that says
plainly that no formal guarantee holds.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.privacy.accounting import PRV_EPS_ERROR, compute_epsilon
from fedlora.privacy.ledger import PrivacyLedger, write_json_atomic
from fedlora.privacy.report_render import format_epsilon, render_html, render_markdown
from fedlora.privacy.runfile import RunFacts, ledger_path, load_run_ledgers

REPORT_FORMAT = "fedlora.privacy-report/1"
NO_GUARANTEE = (
    "No differential privacy was applied in this run. No formal privacy guarantee holds: the "
    "adapter updates, metrics and final model may reveal information about any client's training data."
)
NOT_COVERED = [
    "Metrics that clients report (training loss, evaluation accuracy and the like) are sent without noise.",
    "Example counts and which clients took part in which round are sent or observable without noise.",
    "Hyper-parameter tuning: every run trained on the same data spends budget too; ε here is this run alone.",
    "The pretrained base model and the data it was trained on, and any public data or tokenizer.",
    "Secure randomness: noise and sampling come from torch's pseudo-random generator "
    "(Opacus secure_mode is off), so floating-point and RNG attacks are not mitigated.",
]
NOT_COVERED_BY_MODE = {
    "record": "Record-level DP protects single examples; a client's dataset as a whole (e.g. its size or "
    "its label mix) is not protected, and neither are users who contribute many examples.",
    "client": "Client-level DP protects a client's whole participation against whoever sees the released "
    "global adapters; the server itself sees every clipped update before noise (it is trusted).",
}


def _json_number(x: float | None) -> float | str | None:
    # Strict JSON has no Infinity: spell it out.
    return "inf" if x is not None and math.isinf(x) else x


def summarize_ledger(
    ledger: PrivacyLedger,
    target_epsilon: float | None = None,
    with_prv: bool = True,
    budget_accountant: str = "rdp",
) -> dict[str, Any]:
    """Return one client's report row: parameters, rounds, ε (RDP and PRV) and the RDP trajectory.

    ``epsilon_prv`` is None and ``prv_error`` names the reason when the PRV accountant is
    skipped or fails (it cannot handle every parameter range). ``within_budget`` compares
    the ``budget_accountant``'s ε (falling back to RDP without PRV) with ``target_epsilon``.
    """
    eps_rdp = ledger.epsilon("rdp")
    eps_prv: float | None = None
    prv_error: str | None = None if with_prv else "not requested"
    if with_prv:
        try:
            eps_prv = compute_epsilon(ledger.history, ledger.delta, "prv")
        except Exception as e:  # the PRV domain search fails on some extreme (σ, q, steps)
            prv_error = f"{type(e).__name__}: {e}"
    budget_eps = eps_prv if budget_accountant == "prv" and eps_prv is not None else eps_rdp
    return {
        "client_id": ledger.client_id,
        "unit": ledger.unit,
        "delta": ledger.delta,
        "max_grad_norm": ledger.max_grad_norm,
        "noise_multipliers": sorted({e.noise_multiplier for e in ledger.entries}),
        "sample_rates": sorted({e.sample_rate for e in ledger.entries}),
        "sampling": sorted({e.sampling for e in ledger.entries}),
        "rounds": ledger.rounds,
        "total_steps": ledger.total_steps,
        "epsilon_rdp": eps_rdp,
        "epsilon_prv": eps_prv,
        "prv_error": prv_error,
        "trajectory_rdp": ledger.epsilon_trajectory("rdp"),
        "target_epsilon": target_epsilon,
        "within_budget": None if target_epsilon is None else bool(budget_eps <= target_epsilon),
    }


def build_report(
    ledgers: Mapping[str, PrivacyLedger], facts: RunFacts, with_prv: bool = True
) -> dict[str, Any]:
    """Return the report as a JSON-ready dict (the content of ``privacy_report.json``)."""
    rows = [
        summarize_ledger(ledgers[k], facts.target_epsilon, with_prv, facts.accountant)
        for k in sorted(ledgers)
    ]
    dp = facts.mode != "none" and bool(rows)
    if dp:
        key = "epsilon_prv" if facts.accountant == "prv" else "epsilon_rdp"
        worst = max(r[key] if r[key] is not None else r["epsilon_rdp"] for r in rows)
        whom = "every client's training data" if facts.mode == "record" else "every client"
        guarantee = (
            f"{whom[0].upper()}{whom[1:]} is protected by ({format_epsilon(worst)}, {rows[0]['delta']:g})-"
            f"differential privacy or better, with neighbouring datasets differing by: {facts.neighbouring} "
            f"(largest ε over {len(rows)} ledger(s), Opacus {facts.accountant.upper()} accountant). "
            "Each ledger's own ε is listed below."
        )
    elif facts.mode != "none":
        guarantee = "DP was configured but no client completed a DP round: nothing was released under DP."
    else:
        guarantee = NO_GUARANTEE
    not_covered = list(NOT_COVERED)
    if facts.mode in NOT_COVERED_BY_MODE:
        not_covered.insert(0, NOT_COVERED_BY_MODE[facts.mode])
    if facts.sampling == "fixed":
        not_covered.append("Sampling was fixed-size: no amplification by subsampling is claimed (q = 1).")
    return {
        "format": REPORT_FORMAT,
        "formal_guarantee": dp,
        "guarantee": guarantee,
        "facts": facts.to_dict(),
        "method": {
            "record": "DP-SGD (Abadi et al. 2016) on each client, per-example clipping to C",
            "client": "DP-FedAvg (McMahan et al. 2018) on the server, per-client clipping to C",
            "none": "none",
        }[facts.mode],
        "accounting": (
            "ε recomputed from each whole ledger with Opacus "
            f"{facts.library_versions.get('opacus', '?')}: RDPAccountant (default orders) and "
            f"PRVAccountant (eps_error={PRV_EPS_ERROR}, upper bound reported)"
        ),
        "not_covered": not_covered,
        "clients": [
            {
                **r,
                "epsilon_rdp": _json_number(r["epsilon_rdp"]),
                "epsilon_prv": _json_number(r["epsilon_prv"]),
                "trajectory_rdp": [[rd, _json_number(e)] for rd, e in r["trajectory_rdp"]],
            }
            for r in rows
        ],
    }


def epsilon_plot_png(report: Mapping[str, Any]) -> bytes | None:
    """Return a PNG of ε after every round, one line per client (None when there is nothing to plot)."""
    clients = [c for c in report["clients"] if c["trajectory_rdp"]]
    if not clients:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for c in clients:
            pts = [(r, float(e)) for r, e in c["trajectory_rdp"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c["client_id"])
        target = report["facts"].get("target_epsilon")
        if target is not None:
            ax.axhline(target, linestyle="--", color="black", label=f"target ε = {target:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("round")
        ax.set_ylabel(f"ε (RDP, δ = {clients[0]['delta']:g})")
        ax.set_title("Privacy spent after each round")
        if len(clients) <= 12:
            ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def write_report(run_dir: str | os.PathLike[str], with_prv: bool = True) -> dict[str, Path]:
    """Write ``privacy_report.{md,html,json}`` for the run in ``run_dir`` and return their paths.

    A run without ``privacy/ledger.json`` is reported as a run without DP.
    """
    run = Path(run_dir)
    if ledger_path(run).exists():
        ledgers, facts = load_run_ledgers(run)
    else:
        ledgers, facts = {}, RunFacts.create("none")
    report = build_report(ledgers, facts, with_prv=with_prv)
    png = epsilon_plot_png(report)
    data_uri = None if png is None else "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    paths = {
        "json": write_json_atomic(run / "privacy_report.json", report),
        "md": run / "privacy_report.md",
        "html": run / "privacy_report.html",
    }
    _write_text(paths["md"], render_markdown(report, data_uri))
    _write_text(paths["html"], render_html(report, data_uri))
    return paths


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``privacy_report.json`` of a run."""
    return json.loads((Path(run_dir) / "privacy_report.json").read_text(encoding="utf-8"))
