"""Mutation testing of the aggregation math and the privacy accounting (mutmut; not part of CI).

Copies the working tree (tracked and untracked, non-ignored files) into a scratch directory,
adds a ``[tool.mutmut]`` table to the copy's ``pyproject.toml`` and runs ``mutmut run`` there,
so the checkout itself is never modified. Every mutant of the named files is run against the
fast tests that cover it; the score and every surviving mutant (with its diff) are printed and
written to ``<workdir>/mutation-summary.txt``. See docs/testing.md for the latest numbers.

Usage::

    python scripts/mutation.py                      # strategies/ and the four privacy modules
    python scripts/mutation.py --only strategies/ffa.py --max-children 2
    python scripts/mutation.py --workdir /tmp/mut --keep   # reuse/keep the scratch copy
    python scripts/mutation.py --workdir /tmp/mut --rerun-alive  # after adding tests: rerun survivors
    python scripts/mutation.py --only "strategies/*.py" --carry-from /tmp/mut  # changed files in full,
                                    # unchanged ones: only their survivors, against the current tests

Needs the ``test`` extra (``pip install -e '.[test]'``), which pins mutmut.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TARGETS = [
    "strategies/*.py",
    "fedlora/privacy/accounting.py",
    "fedlora/privacy/ledger.py",
    "fedlora/privacy/client_dp.py",
    "fedlora/privacy/calibrate.py",
]
# Fast tests of the mutated code (no Flower runs, no pretrained model).
TESTS = [
    "tests/strategies",
    "tests/adversary/test_robust_math.py",  # strategies/robust.py
    "tests/privacy/test_privacy_ledger.py",
    "tests/privacy/test_privacy_calibrate.py",
    "tests/privacy/test_calibrate_edges.py",
    "tests/privacy/test_privacy_client_dp.py",
    "tests/privacy/test_report_claims.py",
    "tests/privacy/test_server_client_dp.py",
    "tests/privacy/test_client_dp_edges.py",
    "tests/privacy/test_resume_accounting.py",
    "tests/privacy/test_ledger_mutation.py",
    "tests/privacy/test_client_dp_mutation.py",
    "tests/privacy/test_accounting_mutation.py",
    "tests/privacy/test_mutation_kills_calibrate.py",
]
# pytest's unraisableexception plugin runs gc.collect() several times per session: with torch
# loaded that is ~0.4 s of every mutant's ~0.45 s of pytest overhead (measured), so it is off.
PYTEST_ARGS = ["-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:unraisableexception", "-x", "-q"]
# Registry and wiring code whose mutants only change error wording or import-time glue.
DO_NOT_MUTATE = ["strategies/__init__.py"]


def copy_tree(dest: Path) -> None:
    """Copy every tracked and untracked, non-ignored file of the checkout into ``dest``."""
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    ).stdout.decode()
    for rel in filter(None, out.split("\0")):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


def toml_list(items: list[str]) -> str:
    """Return ``items`` as a TOML array of strings."""
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def write_config(dest: Path, targets: list[str], tests: list[str]) -> None:
    """Append the mutmut configuration to the scratch copy's pyproject.toml."""
    tests = [t for t in tests if (dest / t).exists()]
    conf = f"""
[tool.mutmut]
source_paths = ["strategies", "fedlora"]
only_mutate = {toml_list(targets)}
do_not_mutate = {toml_list(DO_NOT_MUTATE)}
also_copy = ["clients", "server", "simulations", "docs", "scripts"]
pytest_add_cli_args = {toml_list(PYTEST_ARGS)}
pytest_add_cli_args_test_selection = {toml_list(tests)}
process_isolation = "forkserver"
# A mutant that loops (a bisection that never ends) is stopped after (t + 3) x 2 x 2 CPU seconds,
# t being the selected tests' clean time: seconds, not the minutes mutmut's defaults allow.
timeout_multiplier = 2.0
timeout_constant = 3.0
use_git_change_detection = false
"""
    with (dest / "pyproject.toml").open("a", encoding="utf-8") as f:
        f.write(conf)


def alive_mutants(work: Path) -> list[str]:
    """Return the names of the mutants in ``work`` that survived, that no test reached, or not yet run."""
    from mutmut.stats import status_by_exit_code

    names = []
    for path in sorted((work / "mutants").rglob("*.py.meta")):
        for name, code in json.loads(path.read_text()).get("exit_code_by_key", {}).items():
            if code is None or status_by_exit_code[code] in (
                "survived",
                "no tests",
                "not checked",
                "check was interrupted by user",
            ):
                names.append(name)
    return names


def module_of(rel: str) -> str:
    """Return the dotted module of a source path (``strategies/fair.py`` -> ``strategies.fair``)."""
    return rel[: -len(".py")].replace("/", ".")


def carried_results(work: Path, only: list[str], earlier: list[Path]) -> tuple[list[str], dict[str, Path]]:
    """Plan a rerun that reuses earlier results where the source has not changed.

    For every file of ``work`` matched by ``only``, the first workdir of ``earlier`` that holds
    byte-identical source and its mutmut results is its origin: only the mutants not killed there
    are run again (against the current tests), the others keep their earlier result. A file with
    no such origin is mutated in full. Returns the mutant names or patterns to run and the
    origin of each carried file.
    """
    names: list[str] = []
    origins: dict[str, Path] = {}
    files = sorted({str(p.relative_to(work)) for pat in only for p in work.glob(pat) if p.is_file()})
    for rel in files:
        if any(rel == d or rel.endswith("/" + d) for d in DO_NOT_MUTATE):
            continue
        src = (work / rel).read_bytes()
        origin = next(
            (
                old
                for old in earlier
                if (old / rel).is_file()
                and (old / rel).read_bytes() == src
                and (old / "mutants" / f"{rel}.meta").is_file()
            ),
            None,
        )
        if origin is None:
            names.append(module_of(rel) + ".*")
            continue
        origins[rel] = origin
        names += [n for n in alive_mutants(origin) if n.startswith(module_of(rel) + ".")]
    return names, origins


def merge_carried(work: Path, origins: dict[str, Path]) -> None:
    """Give every mutant of a carried file that this run did not check its earlier result."""
    for rel, origin in origins.items():
        new_path = work / "mutants" / f"{rel}.meta"
        if not new_path.is_file():
            continue
        new = json.loads(new_path.read_text())
        old = json.loads((origin / "mutants" / f"{rel}.meta").read_text()).get("exit_code_by_key", {})
        codes = new.setdefault("exit_code_by_key", {})
        for name, code in codes.items():
            if code is None and name in old:
                codes[name] = old[name]
        new_path.write_text(json.dumps(new))


def refresh_tests(work: Path) -> None:
    """Copy the checkout's ``tests/`` over the scratch copy's (new tests for a rerun)."""
    shutil.copytree(ROOT / "tests", work / "tests", dirs_exist_ok=True)


def summarize(work: Path, max_diffs: int = 400) -> str:
    """Return the score per file and the diff of every mutant that no test killed.

    Killed: a test failed (or the mutant timed out, e.g. an endless loop). Not killed: the tests
    passed ("survived") or no selected test reached the code ("no tests"). The score is killed
    over killed plus not killed; skipped or unchecked mutants are left out and counted apart.
    """
    from mutmut.stats import status_by_exit_code

    totals: dict[str, dict[str, int]] = {}
    alive: list[str] = []
    for path in sorted((work / "mutants").rglob("*.py.meta")):
        rel = str(path.relative_to(work / "mutants"))[: -len(".meta")]
        counts = totals.setdefault(rel, {"killed": 0, "alive": 0, "other": 0})
        for name, code in json.loads(path.read_text()).get("exit_code_by_key", {}).items():
            status = status_by_exit_code[code]
            if status in ("killed", "timeout", "caught by type check"):
                counts["killed"] += 1
            elif status in ("survived", "no tests"):
                counts["alive"] += 1
                alive.append(f"{name} ({status})")
            else:
                counts["other"] += 1
    lines = [f"{'file':40s} {'killed':>7s} {'alive':>6s} {'other':>6s}  score"]
    k_all = a_all = 0
    for rel, c in sorted(totals.items()):
        done = c["killed"] + c["alive"]
        if not done and not c["other"]:
            continue
        k_all, a_all = k_all + c["killed"], a_all + c["alive"]
        score = f"{100 * c['killed'] / done:5.1f}%" if done else "  n/a"
        lines.append(f"{rel:40s} {c['killed']:7d} {c['alive']:6d} {c['other']:6d}  {score}")
    pct = 100 * k_all / max(1, k_all + a_all)
    lines.append(f"TOTAL: {k_all} of {k_all + a_all} mutants killed ({pct:.1f}%)")
    lines += ["", "mutants not killed:"]
    with contextlib.chdir(work):
        import mutmut.__main__ as mm  # reads the configuration of the current directory

        for i, entry in enumerate(alive):
            name = entry.split(" ", 1)[0]
            if i >= max_diffs:
                lines.append(f"## {entry}")
                continue
            diff = mm.get_diff_for_mutant(name, path=mm.find_mutant(name).path)
            lines += [f"## {entry}", diff.strip(), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run mutation testing; return mutmut's exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="*", default=TARGETS, help="glob patterns of files to mutate")
    ap.add_argument("--tests", nargs="*", default=TESTS, help="test paths run against each mutant")
    ap.add_argument("--max-children", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--timeout", type=float, default=3600.0, help="stop mutmut after this many seconds")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument(
        "--carry-from",
        nargs="*",
        type=Path,
        default=[],
        help="earlier workdirs: for each file whose source is unchanged there, run only the mutants "
        "not killed there (with the current tests) and keep its other results",
    )
    ap.add_argument(
        "--rerun-alive",
        action="store_true",
        help="in an existing --workdir: copy the current tests in and run only the mutants not killed yet",
    )
    args = ap.parse_args(argv)
    if args.rerun_alive and (args.workdir is None or not (args.workdir / "pyproject.toml").exists()):
        ap.error("--rerun-alive needs the --workdir of an earlier run")
    if args.carry_from and args.rerun_alive:
        ap.error("--carry-from starts a fresh scratch copy; it cannot be combined with --rerun-alive")

    work = args.workdir or Path(tempfile.mkdtemp(prefix="fedlora-mutation-"))
    fresh = not (work / "pyproject.toml").exists()
    if args.carry_from and not fresh:
        ap.error(f"--carry-from needs a fresh --workdir; {work} already holds a run")
    origins: dict[str, Path] = {}
    if fresh:
        work.mkdir(parents=True, exist_ok=True)
        copy_tree(work)
        write_config(work, args.only, args.tests)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "TOKENIZERS_PARALLELISM": "false",
    }
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children)]
    if args.rerun_alive:
        refresh_tests(work)
        names = alive_mutants(work)
        if not names:
            print(summarize(work))
            return 0
        cmd += names
    elif args.carry_from:
        names, origins = carried_results(work, args.only, args.carry_from)
        for rel, origin in sorted(origins.items()):
            print(f"{rel}: unchanged since {origin}; rerunning its mutants not killed there")
        if not names:
            print("nothing to run: every mutant of the carried files was killed already")
            return 0
        cmd += names
    # Own process group: on timeout mutmut and its fork server / workers are stopped together.
    proc = subprocess.Popen(cmd, cwd=work, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGINT)  # mutmut saves every result as it comes
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"mutmut stopped after {args.timeout:.0f} s; the summary covers the mutants run so far")
        rc = 124
    merge_carried(work, origins)
    carried = "".join(f"carried from {o}: {r}\n" for r, o in sorted(origins.items()))
    summary = summarize(work) + f"\n\n{carried}wall time: {time.monotonic() - t0:.0f} s\n"
    (work / "mutation-summary.txt").write_text(summary, encoding="utf-8")
    print(summary)
    print(f"summary: {work / 'mutation-summary.txt'}")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
