"""Command line of the one-off studies (see :mod:`experiments`).

Examples::

    python -m experiments list
    python -m experiments dp_curve              # full size, writes experiments/results/dp_curve.*
    python -m experiments quality --quick --out /tmp/q   # a seconds-long smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.harness import write_result
from experiments import EXPERIMENTS, RESULTS_DIR, get


def main(argv: list[str] | None = None) -> int:
    """Run the named study (or ``list`` them); return the exit status."""
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m experiments", description=description)
    parser.add_argument("name", help=f"one of {', '.join(EXPERIMENTS)}, or 'list'")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, numbers meaningless")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"result directory (default {RESULTS_DIR}; quick: ./bench-quick)",
    )
    args = parser.parse_args(argv)
    if args.name == "list":
        print("\n".join(EXPERIMENTS))
        return 0
    if args.name not in EXPERIMENTS:
        parser.error(f"unknown experiment {args.name!r}; choose one of {', '.join(EXPERIMENTS)} or 'list'")
    out = args.out if args.out is not None else (Path("bench-quick") if args.quick else RESULTS_DIR)
    t0 = time.perf_counter()
    result, table = get(args.name)(args.quick)
    result = {"quick": args.quick, "wall_seconds": round(time.perf_counter() - t0, 2), **result}
    path = write_result(args.name, result, table, out)
    print(f"## {args.name} ({result['wall_seconds']} s) -> {path}\n\n{table}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
