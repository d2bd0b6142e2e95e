"""Record-level DP for one client round: budget check, Opacus wrapping, ledger bookkeeping.

The client's :class:`~fedlora.privacy.ledger.PrivacyLedger` is its accountant: one per
client for the whole run, kept in Flower's ``context.state`` (simulation and deployment)
and, when the node sets ``state-dir``, in a file too, so a restarted SuperNode continues
where it was. Each round appends the steps actually taken; ε is always computed from the
whole history.

The noise multiplier is either given (``privacy.noise_multiplier``) or calibrated once from
the target ε for the *whole planned run*: every round the client could take part in,
times its local steps per round, at its sampling rate q = batch size / local examples.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context
from torch.utils.data import DataLoader

from clients.node import NodeSettings
from fedlora.atomic import owned_dir
from fedlora.config import RunConfig
from fedlora.privacy.calibrate import calibrate_noise_multiplier, planned_steps
from fedlora.privacy.calibrate import would_exceed as exceeds_budget
from fedlora.privacy.dpsgd import PrivateTraining, make_private_lora
from fedlora.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger, parse_received
from fedlora.protocol import DP_MARKER
from fedlora.train import Wrap

log = logging.getLogger(__name__)

STATE_KEY = "fedlora-privacy"
LEDGER_FILE = "privacy_ledger.json"
STATE_ROOT_ENV = "FEDLORA_NODE_STATE_ROOT"
"""Set by ``fedlora simulate`` to ``<run dir>/nodes``: a virtual node without ``state-dir`` keeps its
ledger in ``<root>/partition-<id>``, so a killed and resumed simulation still knows what it spent."""


UNCOVERED_METRICS = (
    "train-loss",
    "local-val-loss",
    "local-val-accuracy",
    "train-seconds",
    "val-seconds",
    "clientapp-seconds",
)
"""Metrics computed from the client's data WITHOUT noise: under DP they never leave the node.

The timings are on the list because time is a function of the data where work is (a step's
cost followed its longest record before DP training stopped trimming padding); under DP the
work is fixed, and the residual channels are listed in the privacy report."""


def covered_metrics(cfg: RunConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """Return ``metrics`` without what the DP guarantee does not cover (unchanged without DP).

    The training loss, local validation loss/accuracy and the timings are exact functions of
    the client's records; sending them would release data the noise does not protect. The example count
    stays (the aggregation strategies weigh by it; the report says it is not protected).
    """
    if cfg.privacy.mode == "none":
        return metrics
    return {k: v for k, v in metrics.items() if k not in UNCOVERED_METRICS}


TEXT_CHARS_PER_TOKEN = 32
"""Under DP a record's text is cut at this many characters per token of ``model.max_length`` before
tokenising: far more than any tokenizer keeps, so the encoding is unchanged, but one huge record
can no longer make the round measurably slower."""


MAX_TOKENS_FOR_TEXT_CAP = 1024
"""The text cap never grows past this many tokens' worth, whatever ``max_length`` the server sends."""


def bounded_text(records: list[dict[str, Any]], cfg: RunConfig) -> list[dict[str, Any]]:
    """Return ``records`` with every string field cut at ``TEXT_CHARS_PER_TOKEN`` characters per token.

    The cap follows ``model.max_length`` up to :data:`MAX_TOKENS_FOR_TEXT_CAP` tokens (the server
    picks ``max_length``: an unbounded cap let one huge record show in the reply latency), and
    text that is not valid UTF-8 (a lone surrogate) is replaced, so no single record can make
    the tokenizer raise.
    """
    tokens = min(max(1, int(cfg.model.max_length or 512)), MAX_TOKENS_FOR_TEXT_CAP)
    cap = TEXT_CHARS_PER_TOKEN * tokens

    def clean(v: str) -> str:
        return v[:cap].encode("utf-8", "replace").decode("utf-8")

    return [{k: clean(v) if isinstance(v, str) else v for k, v in r.items()} for r in records]


def state_dir(node: NodeSettings) -> str:
    """Return where the node keeps its ledger file: its ``state-dir``, the simulation default, or ``""``."""
    if node.state_dir:
        return node.state_dir
    root = os.environ.get(STATE_ROOT_ENV, "")
    return os.path.join(root, f"partition-{node.partition_id}") if root else ""


def client_id(node: NodeSettings) -> str:
    """Return the stable id under which a client's ledger is reported."""
    return f"client-{node.partition_id}"


def _own_ledger(node: NodeSettings, context: Context) -> PrivacyLedger | None:
    """Return the union of the client's own copies (state file, run state), or None if it has none.

    Raises
    ------
    LedgerError
        If an own copy is unreadable or belongs to another client: refusing to train is
        safer than forgetting what was spent (delete or repair the file to go on).
    """
    own: list[PrivacyLedger] = []
    home = state_dir(node)
    if home and (Path(home) / LEDGER_FILE).is_file():
        path = Path(home) / LEDGER_FILE
        try:
            own.append(PrivacyLedger.from_json(path.read_text(encoding="utf-8")))
        except (LedgerError, OSError) as e:
            raise LedgerError(
                f"this node's privacy ledger {path} cannot be read ({e}); it records budget already spent, "
                "so the client will not train until it is restored (from a backup) or deliberately removed"
            ) from None
    if STATE_KEY in context.state.config_records:
        own.append(PrivacyLedger.from_json(str(context.state.config_records[STATE_KEY]["ledger"])))
    for led in own:
        if (led.client_id, led.unit) != (client_id(node), "record"):
            raise LedgerError(
                f"this node's own privacy ledger belongs to {led.client_id!r} ({led.unit}), not to "
                f"{client_id(node)!r}: was state-dir shared between nodes? Give each node its own state-dir"
            )
    if not own:
        return None
    merged = own[0]
    for led in own[1:]:
        merged = merged.union(led)
    return merged


def _load_ledger(cfg: RunConfig, node: NodeSettings, context: Context, server_copy: str) -> PrivacyLedger:
    """Return the client's ledger: its own copies, plus any entries only the server's copy holds.

    The client's own ledger (state file and ``context.state``) is authoritative for its
    decisions. The server's copy can only ADD entries (:meth:`PrivacyLedger.union` keyed by
    ``(run, round)``): it restores spending a client forgot (a simulation restarted without
    state) and the server's worst-case charges for rounds in flight at a crash, but a forged
    copy cannot remove, replace or re-weigh what the client recorded itself, so it cannot make
    a client that should decline train again. A server copy that does not parse, or names
    another client, is ignored (with a warning).
    """
    fresh = PrivacyLedger(
        client_id=client_id(node),
        unit="record",
        delta=cfg.privacy.delta,
        max_grad_norm=cfg.privacy.max_grad_norm,
    )
    ledger = _own_ledger(node, context) or fresh
    target = node.dp_epsilon if node.dp_epsilon > 0 else None
    # With a state file written before every reply, this ledger holds every round the client spent.
    complete = bool(state_dir(node))
    ledger = replace(ledger, target_epsilon=target, complete=complete)
    if server_copy.strip() and not complete:
        # A complete own ledger (a state file written before every reply) holds every round the client
        # spent, so the server's copy could only add forged or disproved entries: it is not read. Without
        # one, the copy restores what the client may have forgotten (and the server's worst-case charges),
        # parsed within the same bounds the server applies, so a hostile copy cannot stall the node.
        try:
            ledger = ledger.union(parse_received(server_copy))
        except LedgerError as e:
            log.warning("ignoring the server's copy of the privacy ledger: %s", e)
    return ledger


SIGMA_KEY = "fedlora-dp-sigma"


def _calibrated_sigma(cfg: RunConfig, context: Context, target: float, q: float, total_steps: int) -> float:
    """Return σ for ``target`` ε over ``total_steps``, calibrated once per run and kept in context.state.

    Calibration costs seconds (PRV); SuperNodes start a fresh ClientApp process per round,
    so the result is cached in the node's run state, keyed by everything it depends on.
    """
    key = f"{target}|{cfg.privacy.delta}|{q}|{total_steps}|{cfg.privacy.accountant}"
    cached = context.state.config_records.get(SIGMA_KEY)
    if cached is not None and str(cached["key"]) == key:
        return float(cached["sigma"])
    sigma = calibrate_noise_multiplier(
        target, cfg.privacy.delta, q, total_steps, accountant=cfg.privacy.accountant
    )
    context.state.config_records[SIGMA_KEY] = ConfigRecord({"key": key, "sigma": sigma})
    return sigma


@dataclass
class ClientPrivacy:
    """The privacy side of one client round (inactive unless ``privacy.mode = "record"``)."""

    enabled: bool = False
    declined: bool = False
    reason: str = ""
    ledger: PrivacyLedger | None = None
    noise_multiplier: float = 0.0
    sample_rate: float = 0.0
    target_epsilon: float = 0.0
    accountant: str = "prv"
    run: str = ""
    wrap: Wrap | None = None
    _context: Context | None = None
    _node: NodeSettings | None = None
    _private: PrivateTraining | None = None
    _metrics: dict[str, float] = field(default_factory=dict)

    @classmethod
    def for_round(
        cls,
        cfg: RunConfig,
        node: NodeSettings,
        context: Context,
        num_examples: int,
        steps: int,
        server_round: int = 0,
        server_copy: str = "",
    ) -> ClientPrivacy:
        """Prepare this round: calibrate σ, load the ledger, decline if the budget would be exceeded."""
        if cfg.privacy.mode != "record":
            return cls()
        if node.dp_epsilon <= 0:
            log.warning(
                "record-level DP without a node floor: σ and the budget come from the server's run config; "
                "set dp-epsilon in this node's node-config so the node decides them itself"
            )
        ledger = _load_ledger(cfg, node, context, server_copy)
        # Opacus' DPDataLoader samples each record with q = 1 / (number of batches).
        q = 1.0 / max(1, -(-num_examples // cfg.train.batch_size))
        target = node.dp_epsilon
        sigma = cfg.privacy.noise_multiplier
        if sigma <= 0:
            sigma = _calibrated_sigma(
                cfg, context, target, q, planned_steps(cfg.federation.num_rounds, steps)
            )
        self = cls(
            enabled=True,
            ledger=ledger,
            noise_multiplier=sigma,
            sample_rate=q,
            target_epsilon=target,
            accountant=cfg.privacy.accountant,
            run=str(context.run_id),
            _context=context,
            _node=node,
        )
        if target > 0:
            entry = LedgerEntry(
                round=ledger.next_round(self.run, max(1, server_round)),
                noise_multiplier=sigma,
                sample_rate=q,
                steps=steps,
                run=self.run,
            )
            if exceeds_budget(ledger, entry, target, accountant=cfg.privacy.accountant):
                spent = ledger.live_epsilon(cfg.privacy.accountant)[0]
                self.declined = True
                self.reason = (
                    f"another {steps} DP-SGD steps would take ε from {spent:.3f} past the budget "
                    f"{target:g} (δ={cfg.privacy.delta:g}); the client sits this round out"
                )
        self.wrap = self._wrap if not self.declined else None
        return self

    def _wrap(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader
    ) -> tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader]:
        assert self.ledger is not None
        self._private = make_private_lora(
            model,
            optimizer,
            loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.ledger.max_grad_norm,
            poisson_sampling=True,
        )
        return tuple(self._private)  # type: ignore[return-value]

    def commit(self, server_round: int) -> None:
        """Append the round's DP-SGD steps to the ledger and persist it."""
        if not self.enabled or self._private is None or self.ledger is None:
            return
        # A round redone after a server restart spends budget again: it gets the next free label.
        label = self.ledger.next_round(self.run, max(1, server_round))
        entry = replace(self._private.ledger_entry(label), run=self.run)
        self.ledger = self.ledger.append(entry)
        eps = self.ledger.live_epsilon(self.accountant)[0]
        self._metrics = {
            "dp-epsilon": eps,
            "dp-noise-multiplier": entry.noise_multiplier,
            "dp-sample-rate": entry.sample_rate,
            "dp-steps": entry.steps,
        }
        self._persist()

    def _persist(self) -> None:
        assert self.ledger is not None and self._context is not None and self._node is not None
        self._context.state.config_records[STATE_KEY] = ConfigRecord({"ledger": self.ledger.to_json()})
        if state_dir(self._node):
            path = owned_dir(state_dir(self._node))  # ours, no link, not writable by others
            self.ledger.save(path / LEDGER_FILE)

    def close(self) -> None:
        """Detach Opacus hooks from the shared cached model (always call after training)."""
        if self._private is not None:
            self._private.release()
            self._private = None

    def ledger_json(self) -> str:
        """Return the client's ledger as JSON (sent to the server for the report)."""
        return self.ledger.to_json() if self.ledger is not None else json.dumps({})

    def metrics(self) -> dict[str, Any]:
        """Return privacy metrics for the reply."""
        return {**self.marker(), **self._metrics}

    def marker(self) -> dict[str, int]:
        """Return ``{DP_MARKER: 1}`` under record-level DP (so no timing is added later), else nothing."""
        return {DP_MARKER: 1} if self.enabled else {}
