"""The privacy ledger: what one protected party has spent, as data that survives restarts.

Privacy is data. Every round in which a client trains under DP appends one
:class:`LedgerEntry` ``(round, noise_multiplier, sample_rate, steps, sampling)``. ε is
always recomputed from the WHOLE ledger with a library accountant
(:mod:`fedlora.privacy.accounting`: Opacus' RDP, Mironov 2017, or PRV, Gopi et al. 2021),
never re-started per round and never summed by hand.

Two units of privacy use the same ledger (see ``docs/privacy.md``):

``"record"``
    Record-level DP-SGD on a client (Abadi et al. 2016): one ledger per client id, ``steps``
    are optimizer steps, ``sample_rate`` is the Poisson rate of records in a batch.
``"client"``
    Client-level DP-FedAvg on the server (McMahan et al. 2018): ``steps`` is 1 per round,
    ``sample_rate`` the Poisson rate of clients per round.

Fixed-size (shuffled) sampling earns no amplification by subsampling: such entries are
accounted with ``q = 1`` (:attr:`LedgerEntry.accounted_sample_rate`).

Ledgers are immutable; :meth:`PrivacyLedger.append` returns a new one. ``to_dict`` /
``from_dict`` give a JSON form; :meth:`PrivacyLedger.save` writes it atomically.

Entries are keyed by ``(run, round)``: ``run`` is the Flower run id under which the round
was spent. Copies of one party's ledger (its own file, its run state, the server's copy,
the checkpoint) are combined with :meth:`PrivacyLedger.union`, never by picking one: a
union can only add spending, so no copy can make a party forget what it spent. An entry
marked ``pending`` is the server's worst-case charge for a round that was in flight at a
crash; the party's own entry for the same key replaces it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fedlora.atomic import atomic_write
from fedlora.privacy.accounting import (
    RDP_ORDERS,
    check_accountant,
    check_block,
    check_delta,
    compact_history,
    compute_epsilon,
    rdp_epsilon,
    rdp_per_step,
)

Unit = Literal["record", "client"]
Sampling = Literal["poisson", "fixed"]
UNITS: tuple[str, ...] = ("record", "client")
SAMPLINGS: tuple[str, ...] = ("poisson", "fixed")
LEDGER_FORMAT = "fedlora.privacy-ledger/1"
MAX_PRV_TRAJECTORY_POINTS = 16
"""PRV costs about a second per ε: a trajectory shows at most this many rounds (the last included)."""

MAX_RECEIVED_BYTES = 1024 * 1024
MAX_RECEIVED_ENTRIES = 4096
MAX_RECEIVED_BLOCKS = 64
"""Bounds on a ledger another party sends: PRV costs about 0.25 s per distinct (σ, q) pair."""

LIVE_PRV_BLOCKS = 4
"""The per-round ε of a ledger with more distinct (σ, q) pairs than this is the RDP bound (fast)."""

REPORT_PRV_BLOCKS = 16
"""A report computes PRV only for ledgers with at most this many distinct (σ, q) pairs; RDP otherwise."""


class LedgerError(ValueError):
    """A ledger or ledger entry is malformed or would break the ledger's invariants."""


@dataclass(frozen=True)
class LedgerEntry:
    """One round of one DP mechanism.

    Attributes
    ----------
    round
        Server round number (≥ 0); strictly increasing within a ledger.
    noise_multiplier
        σ: noise std divided by the clipping norm.
    sample_rate
        q: the nominal sampling rate (records per batch / N, or clients per round / K).
    steps
        Number of noisy steps (optimizer steps, or 1 for a server aggregation).
    sampling
        ``"poisson"`` (amplification by subsampling applies) or ``"fixed"`` (it does not).
    run
        The run the round belongs to (Flower's run id as text; ``""`` in older ledgers).
    pending
        True for a worst-case charge the server made for a round in flight at a crash,
        not (yet) confirmed by the party itself.
    """

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int
    sampling: Sampling = "poisson"
    run: str = ""
    pending: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.round, bool) or int(self.round) != self.round or self.round < 0:
            raise LedgerError(f"round={self.round!r} must be a non-negative integer")
        try:
            check_block(self.noise_multiplier, self.sample_rate, self.steps)
        except ValueError as e:
            raise LedgerError(f"round {self.round}: {e}") from None
        if self.sampling not in SAMPLINGS:
            raise LedgerError(f"sampling={self.sampling!r} must be one of {list(SAMPLINGS)}")
        if not isinstance(self.run, str):
            raise LedgerError(f"run={self.run!r} must be a string (the run id)")

    @property
    def key(self) -> tuple[str, int]:
        """``(run, round)``: what identifies one spending of budget across ledger copies."""
        return (self.run, int(self.round))

    @property
    def accounted_sample_rate(self) -> float:
        """The q the accountant uses: ``sample_rate`` for Poisson sampling, 1.0 for fixed-size."""
        return float(self.sample_rate) if self.sampling == "poisson" else 1.0

    def block(self) -> tuple[float, float, int]:
        """Return ``(noise_multiplier, accounted_sample_rate, steps)`` for an Opacus accountant."""
        return float(self.noise_multiplier), self.accounted_sample_rate, int(self.steps)

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (``run`` and ``pending`` only when set, as older ledgers read)."""
        out: dict[str, Any] = {
            "round": int(self.round),
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "steps": int(self.steps),
            "sampling": self.sampling,
        }
        if self.run:
            out["run"] = self.run
        if self.pending:
            out["pending"] = True
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """Inverse of :meth:`to_dict`."""
        if not isinstance(data, Mapping):
            raise LedgerError(f"ledger entry must be an object, got {type(data).__name__}")
        missing = {"round", "noise_multiplier", "sample_rate", "steps"} - set(data)
        if missing:
            raise LedgerError(f"ledger entry {dict(data)!r} lacks {sorted(missing)}")
        try:
            return cls(
                round=int(data["round"]),
                noise_multiplier=float(data["noise_multiplier"]),
                sample_rate=float(data["sample_rate"]),
                steps=int(data["steps"]),
                sampling=data.get("sampling", "poisson"),
                run=str(data.get("run", "")),
                pending=bool(data.get("pending", False)),
            )
        except (TypeError, ValueError, OverflowError) as e:
            raise LedgerError(f"ledger entry {dict(data)!r} is invalid: {e}") from None


@dataclass(frozen=True)
class PrivacyLedger:
    """The DP history of one protected party (a client for record-level DP, or the run).

    Attributes
    ----------
    client_id
        Whose ledger this is (for client-level DP the run-wide key, see ``report``).
    unit
        ``"record"`` or ``"client"``: what one neighbouring dataset differs in.
    delta
        δ of the guarantee.
    max_grad_norm
        C: the L2 clipping norm of one unit's contribution.
    entries
        Rounds in increasing order within each run; ``(run, round)`` keys are unique.
    target_epsilon
        The party's own ε budget (e.g. a node's ``dp-epsilon``), or None when it has none.
    complete
        True when the party keeps this ledger in persistent state it writes before every
        release (a node's ``state-dir``): then every round it spent is in it, and a worst-case
        charge it lacks is disproved (it did not train that round).
    """

    client_id: str
    unit: Unit
    delta: float
    max_grad_norm: float
    entries: tuple[LedgerEntry, ...] = field(default_factory=tuple)
    target_epsilon: float | None = None
    complete: bool = False

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise LedgerError(f"unit={self.unit!r} must be one of {list(UNITS)}")
        try:
            check_delta(self.delta)
        except ValueError as e:
            raise LedgerError(str(e)) from None
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise LedgerError(f"max_grad_norm={self.max_grad_norm!r} must be a finite number > 0")
        if self.target_epsilon is not None and not (
            math.isfinite(self.target_epsilon) and self.target_epsilon > 0
        ):
            raise LedgerError(f"target_epsilon={self.target_epsilon!r} must be a finite number > 0 or None")
        object.__setattr__(self, "entries", tuple(self.entries))
        by_run: dict[str, list[int]] = {}
        for e in self.entries:
            by_run.setdefault(e.run, []).append(e.round)
        for run, rounds in by_run.items():
            for prev, cur in itertools.pairwise(rounds):
                if cur <= prev:
                    raise LedgerError(
                        f"ledger of {self.client_id!r}: round {cur} follows round {prev} in run {run!r}; "
                        "rounds must strictly increase within a run (record each round once, after its "
                        "update is released)"
                    )

    def append(self, entry: LedgerEntry) -> PrivacyLedger:
        """Return a new ledger with ``entry`` added at the end.

        Raises
        ------
        LedgerError
            If ``entry.round`` does not exceed the last recorded round.
        """
        return replace(self, entries=(*self.entries, entry))

    def record(
        self,
        round: int,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        sampling: Sampling = "poisson",
        run: str = "",
    ) -> PrivacyLedger:
        """Shorthand for ``append(LedgerEntry(round, σ, q, steps, sampling, run))``."""
        return self.append(LedgerEntry(round, noise_multiplier, sample_rate, steps, sampling, run))

    def next_round(self, run: str, wanted: int) -> int:
        """Return the label for a new entry: ``wanted``, or one past the last label recorded.

        A round redone (after a restart) spends budget again, so it gets the next free label;
        labels increase over the whole ledger, so a round table stays unambiguous. ``run`` is
        kept for callers that label per run.
        """
        done = [e.round for e in self.entries]
        return max(int(wanted), max(done) + 1) if done else int(wanted)

    def without_pending(self) -> PrivacyLedger:
        """Return this ledger without its worst-case charges (a complete ledger disproves them)."""
        return replace(self, entries=tuple(e for e in self.entries if not e.pending))

    def union(self, other: PrivacyLedger) -> PrivacyLedger:
        """Return this ledger plus every entry of ``other`` whose ``(run, round)`` it lacks.

        ``self`` is authoritative: on a key both hold, its entry is kept, unless it is a
        pending worst-case charge and ``other``'s is a confirmed entry. Metadata (id, δ, C,
        target) are ``self``'s. The union can only add spending: ε never decreases.

        Raises
        ------
        LedgerError
            If ``other`` belongs to another party or unit.
        """
        if (other.client_id, other.unit) != (self.client_id, self.unit):
            raise LedgerError(
                f"cannot merge the {other.unit} ledger of {other.client_id!r} into the {self.unit} ledger of "
                f"{self.client_id!r}"
            )
        merged = {e.key: e for e in self.entries}
        order = list(merged)
        for e in other.entries:
            if e.key not in merged:
                merged[e.key] = e
                order.append(e.key)
            elif merged[e.key].pending and not e.pending:
                merged[e.key] = e
        runs = list(dict.fromkeys(run for run, _ in order))
        keys = sorted(order, key=lambda k: (runs.index(k[0]), k[1]))
        return replace(self, entries=tuple(merged[k] for k in keys))

    @property
    def pending_rounds(self) -> list[tuple[str, int]]:
        """``(run, round)`` of the worst-case charges not confirmed by the party."""
        return [e.key for e in self.entries if e.pending]

    @property
    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, accounted_sample_rate, steps)`` per entry, as Opacus takes it."""
        return [e.block() for e in self.entries]

    @property
    def rounds(self) -> list[int]:
        """Rounds this party took part in."""
        return [e.round for e in self.entries]

    @property
    def total_steps(self) -> int:
        """Sum of steps over all entries."""
        return sum(e.steps for e in self.entries)

    def epsilon(self, accountant: str = "rdp", delta: float | None = None) -> float:
        """Return ε at ``delta`` (default: the ledger's δ) for the whole history."""
        return compute_epsilon(self.history, self.delta if delta is None else delta, accountant)

    def live_epsilon(self, accountant: str = "rdp") -> tuple[float, str]:
        """Return ``(ε, accountant used)`` for a progress line, bounded in cost whatever the ledger holds.

        The configured accountant when the ledger has at most :data:`LIVE_PRV_BLOCKS` distinct
        ``(σ, q)`` pairs (one per run, typically); otherwise RDP, an upper bound on the PRV value
        computed from cached per-pair vectors, so a party that sends a ledger of many distinct
        pairs cannot stall every round. Reports use :meth:`epsilon` with the configured one.
        """
        check_accountant(accountant)
        if accountant == "prv" and len(compact_history(self.history)) > LIVE_PRV_BLOCKS:
            accountant = "rdp"
        return self.epsilon(accountant), accountant

    def epsilon_trajectory(self, accountant: str = "rdp") -> list[tuple[int, float]]:
        """Return ``(round, ε after that round)``: ε of prefixes of the ledger.

        ``"rdp"``: every entry, incrementally (a running sum of cached per-step RDP vectors, so
        the whole trajectory costs one conversion per entry). ``"prv"``: about a second per
        point, so at most :data:`MAX_PRV_TRAJECTORY_POINTS` evenly spaced entries, the last always
        included; a long ledger's table then skips rounds rather than taking minutes.
        """
        check_accountant(accountant)
        hist = self.history
        if accountant == "rdp":
            out, total = [], np.zeros(len(RDP_ORDERS))
            for e, (sigma, q, steps) in zip(self.entries, hist, strict=True):
                if sigma == 0.0 and steps:
                    total = total + np.inf
                elif steps:
                    total = total + steps * rdp_per_step(sigma, q)
                eps = math.inf if np.isinf(total).any() else rdp_epsilon(total, self.delta)
                out.append((e.round, eps))
            return out
        n = len(self.entries)
        k = min(n, MAX_PRV_TRAJECTORY_POINTS)
        picks = sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})  # first and last included
        return [
            (self.entries[i].round, compute_epsilon(hist[: i + 1], self.delta, accountant)) for i in picks
        ]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (see ``docs/privacy.md`` for the format)."""
        return {
            "format": LEDGER_FORMAT,
            "client_id": self.client_id,
            "unit": self.unit,
            "delta": float(self.delta),
            "max_grad_norm": float(self.max_grad_norm),
            "entries": [e.to_dict() for e in self.entries],
            **({} if self.target_epsilon is None else {"target_epsilon": float(self.target_epsilon)}),
            **({"complete": True} if self.complete else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        LedgerError
            If the format tag is foreign or a field is missing or invalid.
        """
        if not isinstance(data, Mapping):
            raise LedgerError(f"a ledger must be a JSON object, got {type(data).__name__}")
        fmt = data.get("format", LEDGER_FORMAT)
        if fmt != LEDGER_FORMAT:
            raise LedgerError(
                f"ledger format {fmt!r} is not {LEDGER_FORMAT!r}; was it written by another tool?"
            )
        missing = {"client_id", "unit", "delta", "max_grad_norm"} - set(data)
        if missing:
            raise LedgerError(f"ledger dict lacks {sorted(missing)}")
        entries = data.get("entries", [])
        if not isinstance(entries, list):
            raise LedgerError(f"ledger entries must be a list, got {type(entries).__name__}")
        target = data.get("target_epsilon")
        try:
            return cls(
                client_id=str(data["client_id"]),
                unit=data["unit"],
                delta=float(data["delta"]),
                max_grad_norm=float(data["max_grad_norm"]),
                entries=tuple(LedgerEntry.from_dict(e) for e in entries),
                target_epsilon=None if target is None else float(target),
                complete=bool(data.get("complete", False)),
            )
        except (TypeError, ValueError, OverflowError) as e:
            if isinstance(e, LedgerError):
                raise
            raise LedgerError(f"ledger of {data.get('client_id')!r} is invalid: {e}") from None

    def to_json(self) -> str:
        """Return the ledger as a JSON string (e.g. for Flower's ``context.state``)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        """Inverse of :meth:`to_json`.

        Raises
        ------
        LedgerError
            If ``text`` is not JSON or not a valid ledger (never another exception type).
        """
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as e:
            raise LedgerError(f"ledger is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the ledger to ``path`` atomically and return the path."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> PrivacyLedger:
        """Read a ledger written by :meth:`save`."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as JSON to ``path`` with :func:`fedlora.atomic.atomic_write` (owner-only).

    A crash leaves either the old file or the new one, never a torn one.
    """
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True, allow_nan=True) + "\n")


def parse_received(text: str) -> PrivacyLedger:
    """Parse a ledger another party sent, within bounds that keep the accountant's cost small.

    Raises
    ------
    LedgerError
        If the text exceeds :data:`MAX_RECEIVED_BYTES`, the ledger holds more than
        :data:`MAX_RECEIVED_ENTRIES` entries or more than :data:`MAX_RECEIVED_BLOCKS` distinct
        ``(σ, q)`` pairs, or it does not parse.
    """
    if len(text) > MAX_RECEIVED_BYTES:
        raise LedgerError(f"the ledger is {len(text)} bytes, above the {MAX_RECEIVED_BYTES}-byte limit")
    ledger = PrivacyLedger.from_json(text)
    if len(ledger.entries) > MAX_RECEIVED_ENTRIES:
        raise LedgerError(
            f"the ledger holds {len(ledger.entries)} entries, above the limit {MAX_RECEIVED_ENTRIES}"
        )
    blocks = len(compact_history(ledger.history))
    if blocks > MAX_RECEIVED_BLOCKS:
        raise LedgerError(
            f"the ledger holds {blocks} distinct (noise multiplier, sample rate) pairs, above the limit "
            f"{MAX_RECEIVED_BLOCKS}"
        )
    return ledger
