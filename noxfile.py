"""The everyday loop: ``nox`` runs lint and the fast tests; ``nox -s NAME`` runs one session.

Sessions (``nox -l`` lists them):

* ``lint``: ruff, the linter and the formatter check, at the version the ``test`` extra pins;
* ``fast``: the tests not marked ``slow`` (no Flower simulations, no real SuperNodes): the
  contributor's loop, a few minutes on two cores;
* ``all``: the whole suite, the README's ``python -m pytest`` (what CI runs through ``.ci/run``);
* ``typecheck``: mypy over ``fedlora/``, ``strategies/``, ``server/`` and ``clients/`` (not in CI);
* ``mutation``: mutation testing of the aggregation math and the privacy accounting
  (``scripts/mutation.py``, tens of minutes; arguments after ``--`` go to it);
* ``experiments``: the one-off studies' own tests (``experiments/tests``, outside the default run).

Each session gets its own virtual environment under ``.nox/`` (the first run installs the
project, later ones reuse it with ``-R``); ``nox --no-venv -s fast`` runs in the environment you
are in, after ``pip install -e '.[test]'``. Arguments after ``--`` go to pytest, e.g.
``nox -s fast -- tests/strategies -x``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import nox

ROOT = Path(__file__).resolve().parent
nox.options.sessions = ["lint", "fast"]
nox.options.reuse_existing_virtualenvs = True
PYTHON = "3.11"
# What mypy checks: the product (benchmarks/, experiments/ and tests/ are not type-checked).
TYPED = ["fedlora", "strategies", "server", "clients"]


def pinned(name: str) -> str:
    """Return ``name``'s requirement as the ``test`` extra of pyproject.toml pins it."""
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for req in extra:
        if req.split("==")[0].strip().lower() == name:
            return req
    raise LookupError(f"{name} is not pinned in the test extra of pyproject.toml")


def install_project(session: nox.Session) -> None:
    """Install fedlora with its test extra (skipped, with nox's warning, under ``--no-venv``)."""
    session.install("-e", ".[test]")


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """Check lint rules and formatting with ruff (``pyproject.toml`` holds the settings)."""
    session.install(pinned("ruff"))
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def fast(session: nox.Session) -> None:
    """Run the tests not marked ``slow``: everything but real Flower simulations and deployments."""
    install_project(session)
    session.run("python", "-m", "pytest", "-m", "not slow", *session.posargs)


@nox.session(name="all", python=PYTHON)
def all_tests(session: nox.Session) -> None:
    """Run the whole suite, exactly the README's test command."""
    install_project(session)
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """Type-check the product packages with mypy."""
    install_project(session)
    # Libraries without type information (Flower, Opacus, PEFT, ...) are taken as untyped.
    session.run("mypy", "--python-version", PYTHON, "--ignore-missing-imports", *(session.posargs or TYPED))


@nox.session(python=PYTHON)
def mutation(session: nox.Session) -> None:
    """Run mutation testing (mutmut, pinned in the test extra) in a scratch copy of the checkout."""
    install_project(session)
    session.run("python", "scripts/mutation.py", *session.posargs)


@nox.session(python=PYTHON)
def experiments(session: nox.Session) -> None:
    """Run the one-off studies' tests: their arithmetic by hand and every study's quick mode."""
    install_project(session)
    session.run("python", "-m", "pytest", "experiments/tests", *session.posargs)
