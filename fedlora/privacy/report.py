"""Privacy-budget report of a run: per client, what ε was spent, how, and what it does not cover.

:func:`write_report` reads ``<run_dir>/privacy/ledger.json`` (:mod:`fedlora.privacy.runfile`)
and writes ``privacy_report.md``, ``privacy_report.html`` (one self-contained page: inline
CSS, the plot as a base64 PNG data URI) and ``privacy_report.json`` into ``run_dir``.

Every ε is recomputed from the whole ledger. ONE accountant runs through the report: the
run's budget accountant (``privacy.accountant``; Opacus' PRV, Gopi et al. 2021, by default,
or RDP, Mironov 2017) gives the headline, each ledger's ε and target check, the per-round
trajectory and the plot; the other accountant appears only as a labelled comparison column.
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlora.atomic import atomic_write_text
from fedlora.privacy.accounting import PRV_EPS_ERROR, compact_history, compute_epsilon, replace_one_epsilon
from fedlora.privacy.ledger import REPORT_PRV_BLOCKS, PrivacyLedger, write_json_atomic
from fedlora.privacy.report_render import format_epsilon, render_html, render_markdown
from fedlora.privacy.runfile import RunFacts, ledger_path, load_run_file, load_run_ledgers

REPORT_FORMAT = "fedlora.privacy-report/1"
NO_GUARANTEE = (
    "No differential privacy was applied in this run. No formal privacy guarantee holds: the "
    "adapter updates, metrics and final model may reveal information about any client's training data."
)
NOT_COVERED = [
    "Under DP, clients send no training loss, local validation metrics or timings; the example count of "
    "each client is sent without noise (the aggregation strategies weigh updates by it) and is not "
    "protected, and the sampling rate q = batch / N in the ledger discloses it too.",
    "The neighbouring relation (record level): clients calibrate and budget ε for adding or removing one "
    "example, but every reply discloses the client's data size, so the guarantee that holds is for "
    "replacing one example; the headline and the 'ε replace-one' column give it (about twice the "
    "add/remove value for small sampling rates). The data size itself is not protected.",
    "Which clients took part in which round is observable by the server; the run's own evaluation of the "
    "global adapter on the server's held-out data is computed from released adapters only.",
    "Hyper-parameter tuning: every run trained on the same data spends budget too; ε here is this run alone.",
    "The pretrained base model and the data it was trained on, and any public data or tokenizer.",
    "Timing: under record DP every step processes a fixed number of rows at the encoded length, so its "
    "work does not depend on which records were drawn, and no timing leaves the node. What remains: a "
    "Poisson batch larger than the fixed row count (probability at most 1e-9 per step) takes longer; "
    "data-dependent CPU or GPU timing of the arithmetic itself (subnormal numbers, caches) is not "
    "controlled; the round's duration depends on N, which is disclosed anyway.",
    "Randomness: every DP draw (DP-SGD noise, Poisson masks, DP-FedAvg noise) comes from a ChaCha20 "
    "keystream keyed with 256 bits of OS entropy on the party that applies it, and the noise is "
    "discrete Gaussian on a grid finer than C / sqrt(d) by 2^20 (exact integer sampling, no "
    "floating-point sampler); it is accounted as the continuous Gaussian at the same σ. Client sampling "
    "uses the OS CSPRNG. A party that can read another party's memory is out of scope.",
]
NOT_COVERED_BY_MODE = {
    "record": "Record-level DP protects single examples; a client's dataset as a whole (e.g. its size or "
    "its label mix) is not protected, and neither are users who contribute many examples. Against the "
    "server it holds only for nodes whose operator set a privacy floor (node-config dp-epsilon): a node "
    "without one takes its noise and budget from the run config the server sends.",
    "client": "Client-level DP protects a client's whole participation against the other clients and "
    "whoever sees the released global adapters, NOT against the server: the server sees every individual "
    "update before noise (there is no secure aggregation), so it must be trusted. Server-only artifacts: "
    "the per-node pre-clip update norms in the server's INFO log and any per-node rows of metrics.jsonl "
    "are not covered by the guarantee and must not be shared beyond the server operator.",
}
HEADLINE = {  # (who is protected, against whom)
    "record": (
        "Each client's individual training examples are",
        "against the server, the other clients and anyone who sees the released adapters",
    ),
    "client": (
        "Each client's participation (all of its data) is",
        "against the other clients and anyone who sees the released global adapters, "
        "but not against the server",
    ),
}
OTHER_ACCOUNTANT = {"rdp": "prv", "prv": "rdp"}


def _json_number(x: float | None) -> float | str | None:
    # Strict JSON has no Infinity: spell it out.
    return "inf" if x is not None and math.isinf(x) else x


def _epsilon_or_error(
    ledger: PrivacyLedger, accountant: str, history: Any = None
) -> tuple[float | None, str | None]:
    try:
        hist = ledger.history if history is None else history
        return compute_epsilon(hist, ledger.delta, accountant), None
    except Exception as e:  # the PRV domain search fails on some extreme (σ, q, steps)
        return None, f"{type(e).__name__}: {e}"


def summarize_ledger(
    ledger: PrivacyLedger,
    target_epsilon: float | None = None,
    with_prv: bool = True,
    budget_accountant: str = "rdp",
) -> dict[str, Any]:
    """Return one ledger's report row: parameters, rounds, ε, its target and the ε trajectory.

    ``epsilon`` and ``trajectory`` use ``budget_accountant`` (the run's); ``epsilon_rdp`` and
    ``epsilon_prv`` give both (the other one is the comparison column). PRV is skipped with
    ``with_prv=False`` (then RDP stands in, and says so) and may fail on extreme parameters
    (``prv_error`` names why). ``target_epsilon`` is the ledger's own target (a node's
    ``dp-epsilon``) when it carries one, else the run's.
    """
    eps_rdp = ledger.epsilon("rdp")
    pairs = len(compact_history(ledger.history))
    if not with_prv:
        eps_prv, prv_error = None, "not requested"
    elif pairs > REPORT_PRV_BLOCKS:  # PRV costs ~0.3 s per pair: a hostile ledger must not stall the report
        eps_prv, prv_error = None, f"skipped: {pairs} distinct (σ, q) pairs (more than {REPORT_PRV_BLOCKS})"
    else:
        eps_prv, prv_error = _epsilon_or_error(ledger, "prv")
    accountant = budget_accountant if (budget_accountant == "rdp" or eps_prv is not None) else "rdp"
    eps = eps_prv if accountant == "prv" else eps_rdp
    try:  # RDP: every round, incrementally; PRV: at most MAX_PRV_TRAJECTORY_POINTS rounds
        trajectory = ledger.epsilon_trajectory(accountant)
    except Exception:  # the PRV domain search fails on some extreme (σ, q, steps): RDP stands in
        trajectory = ledger.epsilon_trajectory("rdp")
    target = ledger.target_epsilon if ledger.target_epsilon is not None else target_epsilon
    return {
        "client_id": ledger.client_id,
        "unit": ledger.unit,
        "delta": ledger.delta,
        "max_grad_norm": ledger.max_grad_norm,
        "noise_multipliers": sorted({e.noise_multiplier for e in ledger.entries}),
        "sample_rates": sorted({e.sample_rate for e in ledger.entries}),
        "sampling": sorted({e.sampling for e in ledger.entries}),
        "rounds": ledger.rounds,
        "runs": sorted({e.run for e in ledger.entries}),
        "total_steps": ledger.total_steps,
        "worst_case_rounds": [r for _, r in ledger.pending_rounds],
        "accountant": accountant,
        "epsilon": eps,
        "comparison_accountant": OTHER_ACCOUNTANT[accountant],
        "epsilon_rdp": eps_rdp,
        "epsilon_prv": eps_prv,
        "prv_error": prv_error,
        "trajectory": trajectory,
        "target_epsilon": target,
        "target_source": "ledger" if ledger.target_epsilon is not None else ("run" if target else None),
        "within_budget": None if target is None else bool(eps <= target),
        # Record level: every reply discloses the data size, under which only replace-one neighbours
        # give a finite ε; the add/remove value above is what the client budgets against.
        "epsilon_replace_one": replace_one_epsilon(ledger.history, ledger.delta)
        if ledger.unit == "record"
        else None,
    }


def build_report(
    ledgers: Mapping[str, PrivacyLedger],
    facts: RunFacts,
    with_prv: bool = True,
    resumes: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Return the report as a JSON-ready dict (the content of ``privacy_report.json``)."""
    rows = [
        summarize_ledger(ledgers[k], facts.target_epsilon, with_prv, facts.accountant)
        for k in sorted(ledgers)
        if ledgers[k].entries or facts.mode == "client"
    ]
    dp = facts.mode != "none" and any(r["total_steps"] for r in rows)
    accountant = rows[0]["accountant"] if rows else facts.accountant
    if dp and facts.mode == "record":
        worst = max(r["epsilon_replace_one"] for r in rows)
        budgeted = max(r["epsilon"] for r in rows)
        who, against = HEADLINE[facts.mode]
        guarantee = (
            f"{who} protected by ({format_epsilon(worst)}, {rows[0]['delta']:g})-differential privacy "
            f"or better {against}, with neighbouring datasets of the same size differing in one example "
            f"(replace-one: every reply discloses the client's data size, so adding or removing an example "
            f"is not hidden). Largest ε over {len(rows)} ledger(s), RDP of the subsampled Gaussian under "
            f"substitution. Clients budget with the add/remove ε of the Opacus {accountant.upper()} "
            f"accountant (largest {format_epsilon(budgeted)}), which would hold only if the data size "
            "were secret. Each ledger's own values and target are listed below; what the guarantee does "
            "not cover is listed at the end."
        )
    elif dp:
        worst = max(r["epsilon"] for r in rows)
        who, against = HEADLINE[facts.mode]
        guarantee = (
            f"{who} protected by ({format_epsilon(worst)}, {rows[0]['delta']:g})-differential privacy "
            f"or better {against}, with neighbouring datasets differing by: {facts.neighbouring} "
            f"(largest ε over {len(rows)} ledger(s), Opacus {accountant.upper()} accountant). "
            "Each ledger's own ε and target are listed below; what the guarantee does not cover is "
            "listed at the end."
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
    charged = sum(int(r.get("charged", 0)) for r in resumes)
    resumed = (
        f"The run was resumed {len(resumes)} time(s); {charged} round(s) in flight when it stopped were "
        "charged as worst-case entries (marked in the ledgers) unless a client's own ledger proved otherwise."
        if resumes
        else "The run was not resumed."
    )
    return {
        "format": REPORT_FORMAT,
        "formal_guarantee": dp,
        "guarantee": guarantee,
        "accountant": accountant,
        "comparison_accountant": OTHER_ACCOUNTANT[accountant],
        "resumes": [dict(r) for r in resumes],
        "resumed": resumed,
        "facts": facts.to_dict(),
        "method": {
            "record": "DP-SGD (Abadi et al. 2016) on each client, per-example clipping to C",
            "client": "DP-FedAvg (McMahan et al. 2018) on the server, per-client clipping to C",
            "none": "none",
        }[facts.mode],
        "accounting": (
            "ε recomputed from each whole ledger with Opacus "
            f"{facts.library_versions.get('opacus', '?')}; {accountant.upper()} throughout (headline, table, "
            f"trajectory, plot), {OTHER_ACCOUNTANT[accountant].upper()} as a comparison column. "
            f"RDPAccountant (default orders); PRVAccountant (eps_error={PRV_EPS_ERROR}, upper bound reported)"
        ),
        "not_covered": not_covered,
        "clients": [
            {
                **r,
                "epsilon": _json_number(r["epsilon"]),
                "epsilon_rdp": _json_number(r["epsilon_rdp"]),
                "epsilon_prv": _json_number(r["epsilon_prv"]),
                "epsilon_replace_one": _json_number(r["epsilon_replace_one"]),
                "trajectory": [[rd, _json_number(e)] for rd, e in r["trajectory"]],
            }
            for r in rows
        ],
    }


def epsilon_plot_png(report: Mapping[str, Any]) -> bytes | None:
    """Return a PNG of ε after every round, one line per client (None when there is nothing to plot)."""
    clients = [c for c in report["clients"] if c["trajectory"]]
    if not clients:
        return None
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for c in clients:
            pts = [(r, float(e)) for r, e in c["trajectory"]]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=c["client_id"])
        targets = sorted({c["target_epsilon"] for c in clients if c["target_epsilon"] is not None})
        for target in targets:
            ax.axhline(target, linestyle="--", color="black", label=f"target ε = {target:g}")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(bottom=0)
        ax.set_xlabel("round")
        ax.set_ylabel(f"ε ({report['accountant'].upper()}, δ = {clients[0]['delta']:g})")
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
        resumes = load_run_file(run).get("resumes", [])
    else:
        ledgers, facts, resumes = {}, RunFacts.create("none"), []
    report = build_report(ledgers, facts, with_prv=with_prv, resumes=resumes)
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
    atomic_write_text(path, text)


def load_report(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read ``privacy_report.json`` of a run."""
    return json.loads((Path(run_dir) / "privacy_report.json").read_text(encoding="utf-8"))
