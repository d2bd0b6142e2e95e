"""FFA-LoRA against FedIT under record DP on ``simulations/dp.toml``, 3 seeds.

Decides issue 10's claim "FFA-LoRA is steadier than FedIT under DP" (Sun et al., ICLR 2024) on
the DP scenario that learns: ``simulations/dp.toml`` as it is (FFA-LoRA, 2 clients x 20,000
records, Poisson batch 256, 4 rounds x 10 steps, r 4, alpha/r 16, lr 0.005, record DP), run once
with ``federation.strategy = "ffa"`` and once with ``"fedit"`` per seed; nothing else differs.
The seed sets ``data.seed``, ``train.seed`` and ``federation.seed`` (as
:func:`experiments.quality.cell_config` does): the generated data, its partition and local split,
the initial adapter and head. It does NOT fix the DP noise nor the Poisson batches: both come
from OS entropy on each client (``fedlora.privacy.dpsgd``), so two runs of one seed still differ
and the spread across seeds includes that noise. The two runs of a seed are paired (same data and
initial adapter).

The noise multiplier is the one an IID client calibrates for the target epsilon over the whole
planned run (:func:`experiments.dp_curve.planned_sigma`), computed once and given to the clients,
which keep the target as their budget and report the epsilon their own ledgers spent.
Every run is wrapped in :class:`~benchmarks.quality_driver.AggregationProbe`: FedIT's
cross-term error per round (FFA-LoRA's is 0 by construction: A is frozen and shared).

"Steadier" is read three ways (:func:`steadiness`, :func:`compare`): a smaller largest
round-to-round drop of held-out accuracy (rounds 0..T, round 0 = the untrained adapter), a
smaller spread across seeds (sample std per round), and a monotone curve; final accuracy and
test loss are reported next to them.

Every finished run is appended to ``experiments/results/dp_claim_runs.jsonl``; ``--resume`` keeps
those and runs only the rest, so the runs can be chunked (one invocation per seed):

    flock /tmp/fedlora-heavy.lock timeout 1000 python -m experiments.dp_claim --resume --seeds 0
    python -m experiments.dp_claim --resume --seeds          # no new runs: tables from the file

``--quick``: :data:`experiments.dp_curve.QUICK` (two clients, one round, one DP step at a given
noise multiplier) for both strategies, seed 0 (seconds; a smoke test, its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import machine, markdown_table, write_result
from benchmarks.quality_driver import run_federated
from experiments import RESULTS_DIR
from experiments.dp_curve import QUICK, SCENARIO, planned_sigma
from experiments.quality import fmt, largest_drop, load_runs, mean_std
from fedlora.config import RunConfig, load_toml, with_overrides

RUNS_FILE = "dp_claim_runs.jsonl"  # one line per finished run, so runs can be chunked and resumed
STRATEGIES = ("ffa", "fedit")  # the claim's favoured method first
SEEDS = (0, 1, 2)
EPSILON = 8.0


def claim_config(cfg: RunConfig, strategy: str, seed: int, sigma: float, epsilon: float | None) -> RunConfig:
    """Return ``cfg`` with only the strategy, the three seeds and the privacy arm changed.

    ``epsilon`` None (quick mode) keeps ``cfg``'s noise multiplier and sets no budget.
    """
    return with_overrides(
        cfg,
        {
            "federation.strategy": strategy,
            "data.seed": seed,
            "train.seed": seed,
            "federation.seed": seed,
            "privacy.mode": "record",
            "privacy.epsilon": 0.0 if epsilon is None else epsilon,
            "privacy.noise_multiplier": sigma,
        },
    )


def run_one(cfg: RunConfig, strategy: str, seed: int, sigma: float, epsilon: float | None) -> dict[str, Any]:
    """Run one (strategy, seed) federation in-process; return its record (the run directory is deleted)."""
    load_start = os.getloadavg()[0]
    t0 = time.perf_counter()
    out = run_federated(claim_config(cfg, strategy, seed, sigma, epsilon), probe=True)
    seconds = time.perf_counter() - t0
    shutil.rmtree(out.pop("run_dir"), ignore_errors=True)  # what the tables need is in ``out``
    return {
        "strategy": strategy,
        "seed": seed,
        "target_epsilon": epsilon,
        "noise_multiplier": sigma,
        **out,
        "seconds": round(seconds, 1),
        "load_average": [round(load_start, 2), round(os.getloadavg()[0], 2)],
    }


def is_monotone(accuracy: Sequence[float]) -> bool:
    """Return True when accuracy never falls from one round to the next."""
    return all(b >= a for a, b in itertools.pairwise(accuracy))


def steadiness(curves: Sequence[Sequence[float]]) -> dict[str, Any]:
    """Return the steadiness of one strategy's accuracy curves (one per seed, equal lengths).

    ``largest_drop``: per seed, the largest round-to-round fall (0 when none); ``std_per_round``:
    the sample std across seeds of each round (0 for one seed); ``spread``: the mean of those over
    the trained rounds 1..T (round 0 is the untrained adapter); ``monotone``: seeds whose curve
    never falls.
    """
    rounds = len(curves[0])
    std = [mean_std([c[t] for c in curves])[1] for t in range(rounds)]
    return {
        "largest_drop": [largest_drop(c) for c in curves],
        "std_per_round": std,
        "spread": statistics.mean(std[1:]) if rounds > 1 else 0.0,
        "monotone": sum(is_monotone(c) for c in curves),
        "seeds": len(curves),
    }


def compare(favoured: dict[str, Any], other: dict[str, Any]) -> dict[str, bool]:
    """Return which steadiness criteria ``favoured`` meets against ``other`` (:func:`steadiness` dicts).

    Each is strict where it can be: a smaller mean largest drop (or both never drop), a smaller
    spread across seeds, and every favoured curve monotone while the other has at least as many
    non-monotone ones. ``all`` is their conjunction: what "steadier" means here.
    """
    fav_drop, oth_drop = statistics.mean(favoured["largest_drop"]), statistics.mean(other["largest_drop"])
    smaller_drop = fav_drop < oth_drop or fav_drop == oth_drop == 0.0
    smaller_spread = favoured["spread"] < other["spread"]
    monotone = favoured["monotone"] == favoured["seeds"] and (
        other["seeds"] - other["monotone"] >= favoured["seeds"] - favoured["monotone"]
    )
    return {
        "smaller_largest_drop": smaller_drop,
        "smaller_spread": smaller_spread,
        "monotone": monotone,
        "all": smaller_drop and smaller_spread and monotone,
    }


def paired(runs: Sequence[dict[str, Any]], favoured: str, other: str) -> list[dict[str, Any]]:
    """Return, per seed run by both strategies, favoured minus other: final accuracy, loss, largest drop."""
    by = {(r["strategy"], r["seed"]): r for r in runs}
    seeds = sorted({s for (m, s) in by if m == favoured} & {s for (m, s) in by if m == other})
    out = []
    for s in seeds:
        f, o = by[(favoured, s)], by[(other, s)]
        out.append(
            {
                "seed": s,
                "final_accuracy": f["accuracy"][-1] - o["accuracy"][-1],
                "final_loss": f["loss"][-1] - o["loss"][-1],
                "largest_drop": largest_drop(f["accuracy"]) - largest_drop(o["accuracy"]),
            }
        )
    return out


def _per_round(values: Sequence[float]) -> str:
    return " / ".join(f"{v:.3f}" for v in values)


def tabulate(runs: Sequence[dict[str, Any]], strategies: Sequence[str]) -> tuple[dict[str, Any], str]:
    """Return the JSON summary and the Markdown tables (per strategy, per run, paired) of ``runs``."""
    summary: dict[str, Any] = {}
    strategy_rows, run_rows = [], []
    for strategy in strategies:
        mine = sorted((r for r in runs if r["strategy"] == strategy), key=lambda r: r["seed"])
        if not mine:
            continue
        curves = [r["accuracy"] for r in mine]
        steady = steadiness(curves)
        rounds = len(curves[0])
        mean_curve = [statistics.mean(c[t] for c in curves) for t in range(rounds)]
        errors = [r["aggregation_error"] for r in mine if r.get("aggregation_error")]
        err = [statistics.mean(e[t] for e in errors) for t in range(len(errors[0]))] if errors else []
        eps = [r["epsilon"] for r in mine if r.get("epsilon") is not None]
        summary[strategy] = {
            "seeds": [r["seed"] for r in mine],
            "accuracy_mean_per_round": mean_curve,
            "final_accuracy": mean_std([c[-1] for c in curves]),
            "final_loss": mean_std([r["loss"][-1] for r in mine]),
            "aggregation_error_mean_per_round": err,
            "epsilon_spent_max": max(eps) if eps else None,
            **steady,
        }
        strategy_rows.append(
            [
                strategy,
                _per_round(mean_curve),
                fmt([c[-1] for c in curves]),
                ", ".join(f"{d:.3f}" for d in steady["largest_drop"]),
                _per_round(steady["std_per_round"]) + f" (mean 1–{rounds - 1}: {steady['spread']:.3f})",
                f"{steady['monotone']} of {steady['seeds']}",
                fmt([r["loss"][-1] for r in mine]),
                _per_round(err) if err else "-",
                f"{max(eps):.2f} (σ {mine[0]['noise_multiplier']:.3f})" if eps else "-",
            ]
        )
        run_rows += [
            [
                strategy,
                r["seed"],
                _per_round(r["accuracy"]),
                f"{largest_drop(r['accuracy']):.3f}",
                f"{r['loss'][-1]:.3f}",
                "-" if r.get("epsilon") is None else f"{r['epsilon']:.2f}",
                f"{r['seconds']:.0f}",
                " – ".join(f"{x:.1f}" for x in r.get("load_average", [])),
            ]
            for r in mine
        ]
    table = markdown_table(
        [
            "strategy",
            "accuracy per round, mean over seeds (0 = untrained)",
            "final accuracy, mean ± std (seeds)",
            "largest round-to-round drop, per seed",
            "std across seeds per round",
            "monotone curves",
            "final test loss",
            "aggregation error per round (mean over seeds)",
            "ε spent (max client)",
        ],
        strategy_rows,
    )
    table += "\n\n" + markdown_table(
        [
            "strategy",
            "seed",
            "accuracy per round",
            "largest drop",
            "final test loss",
            "ε spent",
            "seconds",
            "load average (start – end)",
        ],
        run_rows,
    )
    result: dict[str, Any] = {"summary": summary}
    if len(strategies) >= 2 and strategies[0] in summary and strategies[1] in summary:
        fav, oth = strategies[0], strategies[1]
        diffs = paired(runs, fav, oth)
        result["paired"] = {"favoured": fav, "other": oth, "per_seed": diffs}
        result["criteria"] = compare(summary[fav], summary[oth])
        if diffs:
            acc = [d["final_accuracy"] for d in diffs]
            table += "\n\n" + markdown_table(
                [f"paired ({fav} minus {oth})", *[f"seed {d['seed']}" for d in diffs], "mean ± std"],
                [
                    [name, *[f"{d[key]:+.3f}" for d in diffs], fmt([d[key] for d in diffs])]
                    for name, key in (
                        ("final accuracy", "final_accuracy"),
                        ("final test loss", "final_loss"),
                        ("largest drop", "largest_drop"),
                    )
                ],
            )
            result["paired"]["final_accuracy"] = mean_std(acc)
    return result, table


def run(
    quick: bool,
    *,
    resume: bool = False,
    out_dir: Path | None = None,
    seeds: Sequence[int] = SEEDS,
    strategies: Sequence[str] = STRATEGIES,
    epsilon: float = EPSILON,
) -> tuple[dict[str, Any], str]:
    """Run each (seed, strategy) not yet in the runs file; return the tables over every run in it.

    ``resume`` keeps the runs already in ``out_dir/dp_claim_runs.jsonl`` (otherwise the file starts
    empty); a run is identified by (strategy, seed, target epsilon). ``out_dir`` defaults to
    ``experiments/results`` (quick: a temporary directory). ``quick``: the smoke-sized federation
    at :data:`experiments.dp_curve.QUICK`'s given noise multiplier, seed 0 only.
    """
    unknown = sorted(set(strategies) - set(STRATEGIES))
    if unknown:
        raise ValueError(
            f"unknown strategies {unknown}; choose from {', '.join(STRATEGIES)} (the claim's pair)"
        )
    if not quick and epsilon <= 0:
        raise ValueError(f"epsilon must be > 0 for record DP, got {epsilon}")
    cfg = load_toml(SCENARIO)
    if quick:
        cfg, seeds = with_overrides(cfg, QUICK), tuple(seeds)[:1]
    target = None if quick else float(epsilon)
    if out_dir is None:
        out_dir = Path(tempfile.mkdtemp(prefix="fedlora-dp-claim-")) if quick else RESULTS_DIR
    runs_path = out_dir / RUNS_FILE
    if not resume and runs_path.exists():
        runs_path.unlink()
    runs = load_runs(runs_path)
    done = {(r["strategy"], r["seed"], r["target_epsilon"]) for r in runs}
    todo = [(s, m) for s in seeds for m in strategies if (m, s, target) not in done]
    sigma = cfg.privacy.noise_multiplier if target is None else None
    if todo and sigma is None:
        sigma = planned_sigma(with_overrides(cfg, {"privacy.epsilon": target}), target)
    runs_path.parent.mkdir(parents=True, exist_ok=True)
    for seed, strategy in todo:  # seed-major: a chunk cut short still has both methods of early seeds
        assert sigma is not None
        record = run_one(cfg, strategy, seed, sigma, target)
        runs.append(record)
        with runs_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"  {strategy} seed {seed}: accuracy {record['accuracy']} ({record['seconds']} s)", flush=True)
    mine = [r for r in runs if r["target_epsilon"] == target]
    summary, table = tabulate(mine, STRATEGIES)  # every run in the file, not only this chunk's
    result = {
        "scenario": SCENARIO.name,
        "driver": "in-process (benchmarks.quality_driver)",
        "target_epsilon": target,
        "seeds_fix": "data, partition, local split, initial adapter and head; not the DP noise nor "
        "the Poisson batches (OS entropy on each client)",
        "runs": mine,
        **summary,
        "load_average_end": os.getloadavg(),
    }
    return {**result, "machine": machine()}, table


def main(argv: list[str] | None = None) -> int:
    """``python -m experiments.dp_claim [--resume] [--seeds ...] [--strategies ...] [--epsilon E]``."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.dp_claim", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--resume", action="store_true", help=f"keep the runs already in {RUNS_FILE}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, numbers meaningless")
    parser.add_argument("--seeds", nargs="*", type=int, default=list(SEEDS), help="the seeds to run")
    parser.add_argument(
        "--strategies", nargs="*", default=list(STRATEGIES), help="the strategies to run (default ffa fedit)"
    )
    parser.add_argument("--epsilon", type=float, default=EPSILON, help="target epsilon of the whole run")
    parser.add_argument("--out", type=Path, default=None, help=f"result directory (default {RESULTS_DIR})")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else (Path("bench-quick") if args.quick else RESULTS_DIR)
    t0 = time.perf_counter()
    try:
        result, table = run(
            args.quick,
            resume=args.resume,
            out_dir=out,
            seeds=args.seeds,
            strategies=args.strategies,
            epsilon=args.epsilon,
        )
    except ValueError as err:
        parser.error(str(err))
    result = {"quick": args.quick, "wall_seconds": round(time.perf_counter() - t0, 2), **result}
    print(f"## dp_claim -> {write_result('dp_claim', result, table, out)}\n\n{table}\n", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
