"""Server-side aggregation at Llama-7B shape: every method against one reference, same run.

Shape: 32 layers x {q, k, v, o} projections of 4096 x 4096 (128 LoRA modules), rank 16, 10
clients, float32 factors (what PEFT adapters are). Each method's ``aggregate`` is timed as the
minimum over repetitions and reported as a ratio to the *reference*: the 12-line float32 torch
factored QR+SVD below (issue 10), timed in the same run. Dense SVD of the 4096 x 4096 update is
measured on a few modules and extrapolated to all 128 (said so in the table). FlexLoRA's error is
stated against the dense truncated SVD on those modules. Variants: heterogeneous ranks 4..64
(the methods that support them) and 100 clients (on 2 layers, to fit the machine's memory and time).
Peak memory is the RSS increase during one call (sampled every 5 ms).

    python -m benchmarks aggregation           # full size (minutes; take the heavy-run lock)
    python -m benchmarks aggregation --quick   # tiny shapes, seconds
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.harness import PeakRss, Timing, machine, markdown_table, time_reps
from fedlora.adapters import AdapterState, a_name, b_name
from strategies.base import ClientResult, ClientSpec
from strategies.registry import create

PROJECTIONS = ("q", "k", "v", "o")
ALL_METHODS = ("fedit", "ffa", "flora", "hetlora", "flexlora", "fair")
HETERO_METHODS = ("flora", "hetlora", "flexlora")
# Issue 21's targets: each method's time as a ratio to the reference, at most (plain torch, no
# native code of fedlora's own).
TARGETS = {"fair": 1.5, "flexlora": 0.5}
DEFAULT_TARGET = 0.25


def target(method: str) -> float:
    """Return ``method``'s target ratio to the reference (at most)."""
    return TARGETS.get(method, DEFAULT_TARGET)


@dataclass(frozen=True)
class Setup:
    """One aggregation problem: sizes and client ranks."""

    name: str
    layers: int
    dim: int
    ranks: tuple[int, ...]  # one per client

    @property
    def modules(self) -> int:
        """Number of LoRA modules."""
        return self.layers * len(PROJECTIONS)


def module_names(layers: int) -> list[str]:
    """Return PEFT-style module prefixes of a Llama attention stack."""
    return [
        f"base_model.model.model.layers.{i}.self_attn.{p}_proj" for i in range(layers) for p in PROJECTIONS
    ]


def make_problem(setup: Setup, seed: int = 0) -> tuple[list[ClientSpec], AdapterState, list[ClientResult]]:
    """Return client specs (alpha = 2 r), a global template at rank max(r) and trained-looking results."""
    gen = torch.Generator().manual_seed(seed)
    names, d, rmax = module_names(setup.layers), setup.dim, max(setup.ranks)
    specs = [ClientSpec(i, r, 2.0 * r) for i, r in enumerate(setup.ranks)]

    def state(rank: int, zero_b: bool) -> AdapterState:
        out: AdapterState = {}
        for m in names:
            out[a_name(m)] = torch.randn(rank, d, generator=gen) / d**0.5  # r x d_in
            out[b_name(m)] = torch.zeros(d, rank) if zero_b else 1e-3 * torch.randn(d, rank, generator=gen)
        return out

    template = state(rmax, zero_b=True)
    results = [ClientResult(s, 100 + 7 * s.node_id, state(s.rank, zero_b=False)) for s in specs]
    return specs, template, results


def reference(results: Sequence[ClientResult], rank: int) -> AdapterState:
    """Run the 12-line float32 torch factored QR+SVD FlexLoRA of issue 10 (one module at a time)."""
    n = torch.tensor([float(r.num_examples) for r in results])
    coeffs = (n / n.sum()) * torch.tensor([r.spec.scale for r in results])
    out: AdapterState = {}
    for name in [k for k in results[0].state if k.endswith(".lora_A.weight")]:
        bn = name.replace("lora_A", "lora_B")
        b_cat = torch.cat([c * r.state[bn] for c, r in zip(coeffs, results, strict=True)], dim=1)
        a_cat = torch.cat([r.state[name] for r in results], dim=0)
        q_b, r_b = torch.linalg.qr(b_cat)
        q_a, r_a = torch.linalg.qr(a_cat.T)
        u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        out[name], out[bn] = (vh @ q_a.T)[:rank], (q_b @ u[:, :rank]) * s[:rank]
    return out


def dense_truncated(
    results: Sequence[ClientResult], module: str, rank: int
) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Return one module's dense rank-``rank`` truncation, the seconds its float32 SVD took, and the truth.

    The timed SVD is float32 (what a dense FlexLoRA would run); the truth is the float64 SVD of
    the update formed in float64, against which both the float32 dense result and fedlora's
    factored one are scored.
    """
    n = torch.tensor([float(r.num_examples) for r in results], dtype=torch.float64)
    p = n / n.sum()
    dw64 = sum(
        (float(pk) * r.spec.scale) * r.state[b_name(module)].double() @ r.state[a_name(module)].double()
        for pk, r in zip(p, results, strict=True)
    )  # d_out x d_in
    dw = dw64.float()
    t0 = time.perf_counter()
    u, s, vh = torch.linalg.svd(dw, full_matrices=False)
    seconds = time.perf_counter() - t0
    u64, s64, vh64 = torch.linalg.svd(dw64, full_matrices=False)
    truth = (u64[:, :rank] * s64[:rank]) @ vh64[:rank]
    return (u[:, :rank] * s[:rank]) @ vh[:rank], seconds, truth


def run_setup(setup: Setup, methods: Sequence[str], reps: int, dense_modules: int) -> dict[str, Any]:
    """Measure the reference, ``methods`` and (optionally) dense SVD on one problem.

    Repetitions are interleaved (reference, then every method, ``reps`` times) so a change in
    the machine's load hits all of them alike; each is reported as its minimum. The reference
    runs at torch's default thread count and at one thread, and the faster is the denominator,
    so no ratio comes from a thread setting alone.
    """
    specs, template, results = make_problem(setup)
    rank = max(setup.ranks)
    threads = torch.get_num_threads()
    strategies = {name: create(name) for name in methods}
    states = {name: s.init_state(template, specs) for name, s in strategies.items()}
    seconds: dict[str, list[float]] = {"ref": [], "ref1": [], **{m: [] for m in methods}}
    peaks: dict[str, float] = {}
    outputs: dict[str, AdapterState] = {}

    def one_thread_reference() -> AdapterState:
        torch.set_num_threads(1)
        try:
            return reference(results, rank)
        finally:
            torch.set_num_threads(threads)

    calls = {
        "ref": lambda: reference(results, rank),
        "ref1": one_thread_reference,
        **{m: (lambda m=m: strategies[m].aggregate(states[m], results)) for m in methods},
    }
    for rep in range(reps):
        for key, fn in calls.items():
            if rep == 0:
                with PeakRss() as mem:
                    t = time_reps(fn, 1)
                peaks[key] = round(mem.increase / 2**20, 1)
            else:
                t = time_reps(fn, 1)
            seconds[key].append(t[0].seconds[0])
            if key in methods:
                outputs[key] = t[1]  # type: ignore[assignment]
    ref_key = "ref1" if min(seconds["ref1"]) < min(seconds["ref"]) else "ref"
    ref_timing = Timing(tuple(seconds[ref_key]))
    ref = ref_timing.best
    row: dict[str, Any] = {
        "setup": setup.__dict__ | {"modules": setup.modules},
        "reference": {
            **ref_timing.as_dict(),
            "threads": 1 if ref_key == "ref1" else threads,
            "other_threads_min_s": min(seconds["ref" if ref_key == "ref1" else "ref1"]),
            "peak_rss_increase_mib": peaks[ref_key],
        },
        "methods": {},
    }
    for name in methods:
        stats = {**Timing(tuple(seconds[name])).as_dict(), "peak_rss_increase_mib": peaks[name]}
        stats["ratio_to_reference"] = stats["min_s"] / ref
        stats["target_ratio"] = target(name)
        stats["meets_target"] = stats["ratio_to_reference"] <= target(name)
        row["methods"][name] = stats
        print(
            f"  {setup.name} {name}: {stats['min_s']:.3f} s ({stats['ratio_to_reference']:.2f}x ref)",
            flush=True,
        )
    if dense_modules and "flexlora" in outputs:
        out, scale = outputs["flexlora"], specs[[s.rank for s in specs].index(rank)].scale
        seconds, errors, dense_errors = [], [], []
        for module in module_names(setup.layers)[:dense_modules]:
            dense32, sec, truth = dense_truncated(results, module, rank)
            seconds.append(sec)
            got = scale * out[b_name(module)].double() @ out[a_name(module)].double()
            errors.append(float((got - truth).norm() / truth.norm()))
            dense_errors.append(float((dense32.double() - truth).norm() / truth.norm()))
        per_module = min(seconds)
        row["dense_svd"] = {
            "measured_modules": dense_modules,
            "per_module_min_s": per_module,
            "extrapolated_all_modules_s": per_module * setup.modules,
            "flexlora_speedup": per_module * setup.modules / row["methods"]["flexlora"]["min_s"],
        }
        row["flexlora_rel_error_vs_dense"] = {
            "max": max(errors),
            "modules": len(errors),
            "truth": "float64 dense truncated SVD",
            "float32_dense_svd_max": max(dense_errors),
        }
    return row


def table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown: one line per (setup, method) with seconds, ratio, its target and peak memory."""
    lines = []
    for row in rows:
        s = row["setup"]
        ranks = f"{min(s['ranks'])}-{max(s['ranks'])}"
        what = f"{s['name']}: {s['modules']} modules {s['dim']}x{s['dim']}, {len(s['ranks'])} clients"
        what += f", ranks {ranks}"
        ref = row["reference"]
        lines.append(
            [
                what,
                f"reference (float32 QR+SVD per module, {ref['threads']} thread(s))",
                ref["min_s"],
                1.0,
                "-",
                ref["peak_rss_increase_mib"],
            ]
        )
        for name, m in row["methods"].items():
            met = f"<= {m['target_ratio']:g}: {'met' if m['meets_target'] else 'MISSED'}"
            lines.append([what, name, m["min_s"], m["ratio_to_reference"], met, m["peak_rss_increase_mib"]])
        if "dense_svd" in row:
            d = row["dense_svd"]
            lines.append(
                [
                    what,
                    f"dense SVD (measured on {d['measured_modules']} modules, extrapolated)",
                    d["extrapolated_all_modules_s"],
                    d["extrapolated_all_modules_s"] / ref["min_s"],
                    "-",
                    "-",
                ]
            )
    header = ["problem", "method", "min seconds", "ratio to reference", "target", "peak RSS increase (MiB)"]
    text = markdown_table(header, lines)
    for row in rows:
        if "flexlora_rel_error_vs_dense" in row:
            e, d = row["flexlora_rel_error_vs_dense"], row["dense_svd"]
            text += (
                f"\n\nFlexLoRA ({row['setup']['name']}): relative Frobenius error against the float64 dense "
                f"truncated SVD {e['max']:.2e} (max over {e['modules']} modules; the timed float32 dense "
                f"SVD's own error: {e['float32_dense_svd_max']:.2e}); "
                f"{d['flexlora_speedup']:.0f}x faster than dense SVD extrapolated to every module."
            )
    return text


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Run the aggregation benchmark (``quick``: tiny shapes)."""
    if quick:
        setups = [
            (Setup("homogeneous", 2, 64, (4,) * 3), ALL_METHODS, 2),
            (Setup("heterogeneous", 2, 64, (2, 4, 8)), HETERO_METHODS, 0),
            (Setup("100 clients", 1, 32, (4,) * 20), ALL_METHODS, 0),
        ]
        reps = 1
    else:
        setups = [
            (Setup("7B shape", 32, 4096, (16,) * 10), ALL_METHODS, 2),
            (Setup("7B shape, ranks 4-64", 32, 4096, (4, 8, 16, 32, 64) * 2), HETERO_METHODS, 0),
            (Setup("7B shape, 100 clients", 2, 4096, (16,) * 100), ALL_METHODS, 0),
        ]
        reps = 2
    load_start = machine()["load_average_1min"]
    rows = [run_setup(s, methods, reps, dense) for s, methods, dense in setups]
    result = {"rows": rows, "load_average_1min_start": load_start, "machine": machine()}
    return result, table(rows) + f"\n\nLoad average at the start: {load_start}."
