"""The run-level privacy file ``<run_dir>/privacy/ledger.json``: every ledger plus run facts.

One JSON document, written atomically (temp file + ``os.replace``) by the server after
every round, read by :func:`fedlora.privacy.report.write_report`::

    {
      "format": "fedlora.privacy-run/1",
      "facts": {                      # RunFacts.to_dict()
        "mode": "record",             # "none" | "record" | "client"
        "unit": "record",             # what one neighbouring dataset differs in (null for none)
        "neighbouring": "add/remove one training example of one client's local dataset",
        "sampling": "poisson",        # "poisson" | "fixed" | null
        "amplification_assumed": true,
        "accountant": "rdp",          # the accountant budget decisions used
        "target_epsilon": 8.0,        # or null
        "delta": 1e-05,               # or null
        "strategy": "fedit",          # or null
        "secure_rng": true,
        "secure_rng_reason": "...",
        "library_versions": {"opacus": "1.6.0", "torch": "...", ...}
      },
      "ledgers": {"<client id>": PrivacyLedger.to_dict(), ...},
      "pending": [{"key": "client-0", "run": "17", "round": 3, "num_examples": 120}, ...],
      "resumes": [{"after_round": 2, "charged": 4}, ...]
    }

``pending`` lists the rounds the server has dispatched and not yet closed: written BEFORE
the training messages leave, so a crash mid-round leaves a record of every party that may
have spent budget; a resumed run charges each as a worst-case entry (see
``server/privacy.py``). ``resumes`` counts how often the run was resumed; the report shows it.

For client-level DP there is one ledger, under :data:`CLIENT_LEVEL_KEY`: the guarantee
of DP-FedAvg (McMahan et al. 2018) holds for every client alike.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from fedlora.privacy.accounting import check_accountant
from fedlora.privacy.ledger import LedgerError, PrivacyLedger, write_json_atomic

Mode = Literal["none", "record", "client"]
MODES: tuple[str, ...] = ("none", "record", "client")
RUN_FORMAT = "fedlora.privacy-run/1"
RUN_LEDGER_PATH = Path("privacy") / "ledger.json"
CLIENT_LEVEL_KEY = "all-clients"
SECURE_RNG_REASON = (
    "every DP draw (DP-SGD noise, Poisson sampling masks, DP-FedAvg noise) comes from a ChaCha20 keystream "
    "keyed with 256 bits of OS entropy (os.urandom) on the party that applies it, never stored or sent; "
    "the noise is discrete Gaussian on a fine grid, sampled exactly from integers (no floating-point "
    "sampler), and client sampling uses the OS CSPRNG. Opacus' secure_mode (torchcsprng) is not used: "
    "fedlora's own generator replaces it"
)
NEIGHBOURING: dict[str, str | None] = {
    "none": None,
    "record": "replace one training example in one client's local dataset (its size is disclosed); "
    "clients budget with add/remove",
    "client": "add/remove all data of one client (the client's whole participation in the run)",
}


def library_versions() -> dict[str, str]:
    """Return the versions of the libraries that the ε computation depends on."""
    out = {"python": platform.python_version()}
    for dist in ("fedlora", "opacus", "torch", "numpy", "scipy", "peft"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


@dataclass(frozen=True)
class RunFacts:
    """Run-level facts about the privacy mechanism (see module docstring for the JSON form).

    Build with :meth:`create`, which fills the derived fields.
    """

    mode: Mode
    unit: str | None
    neighbouring: str | None
    sampling: str | None
    amplification_assumed: bool
    accountant: str = "rdp"
    target_epsilon: float | None = None
    delta: float | None = None
    strategy: str | None = None
    secure_rng: bool = True
    secure_rng_reason: str = SECURE_RNG_REASON
    library_versions: dict[str, str] = field(default_factory=library_versions)

    @classmethod
    def create(
        cls,
        mode: str,
        *,
        sampling: str | None = "poisson",
        accountant: str = "rdp",
        target_epsilon: float | None = None,
        delta: float | None = None,
        strategy: str | None = None,
    ) -> RunFacts:
        """Return the facts of a run in ``mode`` with unit, relation and amplification derived.

        Raises
        ------
        ValueError
            If ``mode`` or ``sampling`` is not a known value.
        """
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} must be one of {list(MODES)}")
        check_accountant(accountant)
        if mode == "none":
            sampling = None
        elif sampling not in ("poisson", "fixed"):
            raise ValueError(f"sampling={sampling!r} must be 'poisson' or 'fixed' when mode={mode!r}")
        return cls(
            mode=mode,  # type: ignore[arg-type]
            unit=None if mode == "none" else mode,
            neighbouring=NEIGHBOURING[mode],
            sampling=sampling,
            amplification_assumed=sampling == "poisson",
            accountant=accountant,
            target_epsilon=None if target_epsilon is None else float(target_epsilon),
            delta=None if delta is None else float(delta),
            strategy=strategy,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunFacts:
        """Inverse of :meth:`to_dict`; unknown keys are ignored, missing derived ones re-derived."""
        mode = data.get("mode", "none")
        base = cls.create(
            mode,
            sampling=data.get("sampling", "poisson"),
            accountant=data.get("accountant", "rdp"),
            target_epsilon=data.get("target_epsilon"),
            delta=data.get("delta"),
            strategy=data.get("strategy"),
        )
        known = set(cls.__dataclass_fields__)
        return cls(**{**base.to_dict(), **{k: v for k, v in data.items() if k in known}})


def ledger_path(run_dir: str | os.PathLike[str]) -> Path:
    """Return ``<run_dir>/privacy/ledger.json``."""
    return Path(run_dir) / RUN_LEDGER_PATH


def save_run_ledgers(
    run_dir: str | os.PathLike[str],
    ledgers: Mapping[str, PrivacyLedger],
    facts: RunFacts | Mapping[str, Any],
    *,
    pending: list[dict[str, Any]] | None = None,
    resumes: list[dict[str, Any]] | None = None,
) -> Path:
    """Write every client's ledger and the run facts to ``<run_dir>/privacy/ledger.json`` atomically.

    Parameters
    ----------
    run_dir
        The run directory (created if missing).
    ledgers
        Client id → ledger (record mode), ``{CLIENT_LEVEL_KEY: ledger}`` (client mode), or
        empty (mode ``"none"``).
    facts
        A :class:`RunFacts` or a dict accepted by :meth:`RunFacts.from_dict`.
    pending, resumes
        Rounds dispatched and not yet closed, and the run's resumes (module docstring).

    Raises
    ------
    LedgerError
        If a key differs from its ledger's ``client_id``, or a ledger's unit contradicts the mode.
    """
    run_facts = facts if isinstance(facts, RunFacts) else RunFacts.from_dict(facts)
    for key, ledger in ledgers.items():
        if key != ledger.client_id:
            raise LedgerError(
                f"ledger stored under {key!r} belongs to {ledger.client_id!r}; key it by client_id"
            )
        if run_facts.mode == "none" or ledger.unit != run_facts.unit:
            raise LedgerError(
                f"ledger {key!r} has unit {ledger.unit!r} but the run's mode is {run_facts.mode!r}; "
                "record-level runs keep 'record' ledgers, client-level runs one 'client' ledger"
            )
    doc = {
        "format": RUN_FORMAT,
        "facts": run_facts.to_dict(),
        "ledgers": {k: ledgers[k].to_dict() for k in sorted(ledgers)},
        "pending": list(pending or []),
        "resumes": list(resumes or []),
    }
    return write_json_atomic(ledger_path(run_dir), doc)


def load_run_file(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the raw ``privacy/ledger.json`` document (``{}`` when the run wrote none).

    Raises
    ------
    LedgerError
        If the file exists but is not a fedlora privacy-run document.
    """
    path = ledger_path(run_dir)
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise LedgerError(f"{path} is not valid JSON ({e}); restore it from a backup") from None
    if not isinstance(doc, dict) or doc.get("format") != RUN_FORMAT:
        raise LedgerError(f"{path} is not a {RUN_FORMAT!r} document")
    return doc


def load_run_ledgers(run_dir: str | os.PathLike[str]) -> tuple[dict[str, PrivacyLedger], RunFacts]:
    """Read ``<run_dir>/privacy/ledger.json``; return (client id → ledger, facts).

    Raises
    ------
    FileNotFoundError
        If the run wrote no privacy file.
    LedgerError
        If the file is not a fedlora privacy-run document.
    """
    path = ledger_path(run_dir)
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != RUN_FORMAT:
        raise LedgerError(f"{path} has format {doc.get('format')!r}, expected {RUN_FORMAT!r}")
    facts = RunFacts.from_dict(doc.get("facts", {}))
    ledgers = {k: PrivacyLedger.from_dict(v) for k, v in doc.get("ledgers", {}).items()}
    return ledgers, facts
