"""Render a privacy report dict (:func:`fedlora.privacy.report.build_report`) as Markdown or HTML.

The HTML page is self-contained: inline CSS, the plot as a ``data:`` URI, no scripts and
no external resources, so it can be archived or mailed as one file.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;width:100%;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .5em;text-align:left;vertical-align:top}
th{background:#f2f2f2}.warn{background:#fff3cd;border:1px solid #e0c060;padding:.7em;border-radius:4px}
.ok{background:#e8f4ea;border:1px solid #8bc29a;padding:.7em;border-radius:4px}
code{background:#f5f5f5;padding:0 .2em}img{max-width:100%}
"""


def format_epsilon(x: Any) -> str:
    """Return ε as reports print it: 4 decimals, ``inf`` without noise, ``n/a`` when not computed."""
    if x is None:
        return "n/a"
    if x == "inf" or (isinstance(x, float) and math.isinf(x)):
        return "inf"
    return f"{float(x):.4f}"


def _nums(xs: Sequence[Any]) -> str:
    return ", ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in xs) or "-"


def _rounds(rs: Sequence[int]) -> str:
    return f"{len(rs)} ({_nums(list(rs))})" if rs else "0"


def client_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Return the header and the text cells of the per-ledger table (run accountant first)."""
    acc, other = report["accountant"], report["comparison_accountant"]
    header = [
        "client",
        f"ε ({acc.upper()})",
        "target ε",
        f"ε ({other.upper()}, comparison)",
        "δ",
        "σ",
        "C",
        "q",
        "sampling",
        "steps",
        "rounds",
        "worst-case charged rounds",
        "within target",
    ]
    record = any(c.get("epsilon_replace_one") is not None for c in report["clients"])
    if record:
        header.insert(1, "ε replace-one (holds)")
    rows = []
    for c in report["clients"]:
        comp = c[f"epsilon_{other}"]
        comp_text = format_epsilon(comp) if comp is not None else f"n/a ({c['prv_error']})"
        target = "none" if c["target_epsilon"] is None else f"{c['target_epsilon']:g}"
        if c.get("target_source") == "ledger":
            target += " (node)"
        rows.append(
            [
                str(c["client_id"]),
                format_epsilon(c["epsilon"]),
                target,
                comp_text,
                f"{c['delta']:g}",
                _nums(c["noise_multipliers"]),
                f"{c['max_grad_norm']:g}",
                _nums(c["sample_rates"]),
                ", ".join(c["sampling"]),
                str(c["total_steps"]),
                _rounds(c["rounds"]),
                _nums(c["worst_case_rounds"]) if c["worst_case_rounds"] else "0",
                {True: "yes", False: "NO", None: "no target"}[c["within_budget"]],
            ]
        )
        if record:
            rows[-1].insert(1, format_epsilon(c.get("epsilon_replace_one")))
    return header, rows


def trajectory_rows(report: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Return a round × client table of ε (run accountant) after each round ("" where a client sat out)."""
    rounds = sorted({r for c in report["clients"] for r, _ in c["trajectory"]})
    header = ["round"] + [str(c["client_id"]) for c in report["clients"]]
    by_client = [{r: e for r, e in c["trajectory"]} for c in report["clients"]]
    rows = [[str(r)] + [format_epsilon(t[r]) if r in t else "" for t in by_client] for r in rounds]
    return header, rows


def _facts_items(report: Mapping[str, Any]) -> list[tuple[str, str]]:
    f = report["facts"]
    versions = ", ".join(f"{k} {v}" for k, v in f.get("library_versions", {}).items())
    return [
        ("mode", str(f["mode"])),
        ("method", str(report["method"])),
        ("unit of privacy", str(f["unit"] or "none")),
        ("neighbouring relation", str(f["neighbouring"] or "none")),
        ("sampling", str(f["sampling"] or "none")),
        ("amplification by subsampling assumed", "yes" if f["amplification_assumed"] else "no"),
        ("accountant (headline, table, trajectory, plot)", str(report["accountant"])),
        ("comparison accountant", str(report["comparison_accountant"])),
        ("resumed", str(report["resumed"])),
        ("target ε", "none" if f["target_epsilon"] is None else f"{f['target_epsilon']:g}"),
        ("δ", "none" if f["delta"] is None else f"{f['delta']:g}"),
        ("strategy", str(f["strategy"] or "unspecified")),
        ("how ε was computed", str(report["accounting"])),
        ("secure RNG", f"{'yes' if f['secure_rng'] else 'no'} — {f['secure_rng_reason']}"),
        ("library versions", versions),
    ]


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = ["| " + " | ".join(map(esc, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(esc, r)) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(report: Mapping[str, Any], plot_data_uri: str | None) -> str:
    """Return the report as Markdown."""
    out = ["# Privacy report", ""]
    out += [("" if report["formal_guarantee"] else "**No formal guarantee.** ") + report["guarantee"], ""]
    out += ["## Run facts", "", _md_table(["fact", "value"], [list(kv) for kv in _facts_items(report)]), ""]
    if report["clients"]:
        out += ["## ε per client", "", _md_table(*client_rows(report)), ""]
        acc = report["accountant"].upper()
        out += [f"## ε after each round ({acc})", "", _md_table(*trajectory_rows(report)), ""]
    if plot_data_uri:
        out += [f"![ε after each round]({plot_data_uri})", ""]
    out += ["## What the guarantee does not cover", ""]
    out += [f"- {item}" for item in report["not_covered"]]
    return "\n".join(out) + "\n"


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(report: Mapping[str, Any], plot_data_uri: str | None) -> str:
    """Return the report as one self-contained HTML page."""
    cls = "ok" if report["formal_guarantee"] else "warn"
    lead = "" if report["formal_guarantee"] else "<strong>No formal guarantee.</strong> "
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Privacy report</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Privacy report</h1>",
        f'<p class="{cls}" id="guarantee">{lead}{html.escape(report["guarantee"])}</p>',
        "<h2>Run facts</h2>",
        _html_table(["fact", "value"], [list(kv) for kv in _facts_items(report)]),
    ]
    if report["clients"]:
        parts += ["<h2>ε per client</h2>", _html_table(*client_rows(report))]
        if plot_data_uri:
            parts.append(f'<p><img alt="ε after each round, one line per client" src="{plot_data_uri}"></p>')
        acc = html.escape(report["accountant"].upper())
        parts += [f"<h2>ε after each round ({acc})</h2>", _html_table(*trajectory_rows(report))]
    parts += ["<h2>What the guarantee does not cover</h2>", "<ul>"]
    parts += [f"<li>{html.escape(item)}</li>" for item in report["not_covered"]]
    parts += ["</ul>", "</body></html>"]
    return "\n".join(parts) + "\n"
