"""Command line of the benchmark suite (see :mod:`benchmarks`).

Examples::

    python -m benchmarks list
    python -m benchmarks aggregation            # full size, writes benchmarks/results/aggregation.*
    python -m benchmarks all --quick --out /tmp/bench   # every benchmark's seconds-long smoke mode
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks import BENCHMARKS, get
from benchmarks.harness import RESULTS_DIR, write_result


def main(argv: list[str] | None = None) -> int:
    """Run the named benchmark(s); return the exit status."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help=f"one of {', '.join(BENCHMARKS)}, 'all' or 'list'")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, numbers meaningless")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help=f"result directory (default {RESULTS_DIR}; quick: ./bench-quick)",
    )
    args = parser.parse_args(argv)
    if args.name == "list":
        print("\n".join(BENCHMARKS))
        return 0
    names = list(BENCHMARKS) if args.name == "all" else [args.name]
    if args.name != "all" and args.name not in BENCHMARKS:
        parser.error(
            f"unknown benchmark {args.name!r}; choose one of {', '.join(BENCHMARKS)}, 'all' or 'list'"
        )
    out = args.out if args.out is not None else (Path("bench-quick") if args.quick else RESULTS_DIR)
    for name in names:
        t0 = time.perf_counter()
        result, table = get(name)(args.quick)
        result = {"quick": args.quick, "wall_seconds": round(time.perf_counter() - t0, 2), **result}
        path = write_result(name, result, table, out)
        print(f"## {name} ({result['wall_seconds']} s) -> {path}\n\n{table}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
