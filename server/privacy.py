"""Server-side privacy: client sampling, client-level DP-FedAvg, run ledgers and the report.

Record-level DP (``privacy.mode = "record"``) runs on clients; the server keeps a COPY of
each client's ledger, keyed by the node it received the reply from (its partition as bound
at setup, never the id a reply claims), grown only by union (:meth:`PrivacyLedger.union`),
and writes ``privacy/ledger.json`` after every round.

Client-level DP (``"client"``) is :class:`ClientLevelDP`, a wrapper around any strategy that
declares which tensors it can privatise (``LoraStrategy.dp_tensors``): the round's updates
are clipped to ``privacy.clip_norm``, summed, noised with σ·C from OS entropy and divided by
the expected number of clients (:func:`fedlora.privacy.client_dp.privatize_updates`); the
run ledger gets one step per round, every round, even one without valid updates (the
sampled Gaussian mechanism releases a noisy, possibly empty, sum every step).

Accounting that never under-counts a crash: before a round's messages leave,
:meth:`ServerPrivacy.before_dispatch` writes a pending entry for every party that may spend
budget in it; a resumed run charges every pending entry as a worst-case round
(:meth:`ServerPrivacy.charge_pending`) unless the party's own ledger later proves otherwise.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import Message

from fedlora.adapters import AdapterState, apply_delta, is_lora_a
from fedlora.config import RunConfig
from fedlora.privacy.calibrate import calibrate_noise_multiplier, planned_steps, would_exceed
from fedlora.privacy.client_dp import (
    ClientDPError,
    check_client_sampling,
    expected_clients,
    privatize_updates,
    sample_clients,
)
from fedlora.privacy.ledger import LedgerEntry, LedgerError, PrivacyLedger, parse_received
from fedlora.privacy.randomness import SecureRandom, system_random
from fedlora.privacy.report import write_report
from fedlora.privacy.runfile import CLIENT_LEVEL_KEY, RunFacts, load_run_file, save_run_ledgers
from strategies.base import ClientResult, ClientSpec, LoraStrategy, Payload, StrategyWrapper
from strategies.registry import lookup

log = logging.getLogger(__name__)

MAX_NEW_ENTRIES_PER_REPLY = 4
"""After its first report in a run, a node's ledger grows by about one entry per round it trains."""


class PrivacyBudgetExceeded(Exception):
    """A release would take the run past its ε target.

    Deliberately not a ValueError/RuntimeError: nothing may catch it as an ordinary
    aggregation failure and carry on.
    """


def client_key(partition_id: int) -> str:
    """Return the ledger key of the client bound to ``partition_id`` at setup (``client-<id>``)."""
    return f"client-{int(partition_id)}"


def grid_run_id(grid: Any) -> str:
    """Return the Flower run id of ``grid`` as text (``""`` when the grid has no run, as in unit tests)."""
    try:
        return str(grid.run.run_id)
    except Exception:  # a grid without a run (tests) or an older Flower
        return ""


def privatisable_names(strategy: LoraStrategy | type[LoraStrategy], names: Sequence[str]) -> list[str]:
    """Return the tensor names a strategy's ``dp_tensors`` declaration lets client-level DP noise.

    The strategy class owns the declaration and, when it declares nothing, the reason
    (``dp_refusal``); no strategy names are known here.

    Raises
    ------
    ClientDPError
        If the strategy declares nothing (``dp_tensors`` None): its release is not a noisy sum.
    """
    scope = getattr(strategy, "dp_tensors", None)
    if scope == "all":
        return list(names)
    if scope == "no_lora_a":
        return [n for n in names if not is_lora_a(n)]
    raise ClientDPError(
        f"client-level DP is not supported with strategy {getattr(strategy, 'name', '?')!r}: "
        f"{getattr(strategy, 'dp_refusal', 'it declares no privatisable tensors')}. Use a strategy that "
        "declares dp_tensors (fedit, ffa), or record-level DP on the clients instead"
    )


class ServerPrivacy:
    """Privacy bookkeeping of one run on the server."""

    def __init__(self, cfg: RunConfig, run_dir: Path) -> None:
        self.cfg = cfg
        self.run_dir = run_dir
        p = cfg.privacy
        self.mode = p.mode
        self.ledgers: dict[str, PrivacyLedger] = {}
        self.sigma = p.noise_multiplier
        self.sampling = p.client_sampling if p.mode == "client" else "poisson"
        self.target = p.epsilon if p.epsilon > 0 else None
        if p.mode == "client":
            # Refuse early (before calibrating) a strategy that declares no privatisable tensors.
            cls = lookup(cfg.federation.strategy)
            privatisable_names(cls, [])
            check_client_sampling(
                p.client_sampling, cfg.federation.clients_per_round, cfg.federation.num_clients
            )
            if cfg.robust.aggregator != "mean":
                raise ClientDPError(
                    f"robust.aggregator = {cfg.robust.aggregator!r} cannot run under client-level DP: the "
                    "release is one noisy mean of clipped updates, so a robust centre would have nothing to "
                    "act on (and one computed before the noise would change the release's sensitivity). "
                    "Set robust.aggregator = 'mean'; the DP clip bounds every client's influence"
                )
            if cfg.robust.norm_bound > 0 or cfg.robust.max_weight_factor > 0:
                log.info(
                    "client-level DP: robust.norm_bound and robust.max_weight_factor are not applied (they "
                    "depend on other clients' updates); the DP clip bounds each client at C = %g",
                    p.clip_norm,
                )
            if self.sigma <= 0:
                self.sigma = calibrate_noise_multiplier(
                    p.epsilon,
                    p.delta,
                    self._client_rate(),
                    cfg.federation.num_rounds,
                    accountant=p.accountant,
                )
            self.ledgers[CLIENT_LEVEL_KEY] = PrivacyLedger(
                client_id=CLIENT_LEVEL_KEY,
                unit="client",
                delta=p.delta,
                max_grad_norm=p.clip_norm,
                target_epsilon=self.target,
            )
        # DP draws come from OS entropy (a 256-bit ChaCha20 key), fresh in every process (so after
        # every resume), and are never checkpointed: the run seed is in every client's run config.
        self.noise = SecureRandom()
        self._sampler = system_random()
        self.run_id = ""
        self.round = 0
        self.pending: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self._owners: dict[str, int] = {}
        self._observed: set[str] = set()  # ledgers received in the round in flight
        self._released_round = -1
        self.facts = RunFacts.create(
            p.mode,
            sampling=self.sampling if p.mode != "none" else None,
            accountant=p.accountant if p.mode != "none" else "rdp",
            target_epsilon=p.epsilon or None if p.mode != "none" else None,
            delta=p.delta if p.mode != "none" else None,
            strategy=cfg.federation.strategy,
        )
        if p.mode != "none" and cfg.output.resume:
            self._resume_from_run_file()

    def _client_rate(self) -> float:
        # Calibrate with exactly the q the ledger accounts: fixed-size sampling is only allowed
        # with every client in every round (check_client_sampling), which is q = 1.
        if self.cfg.privacy.client_sampling == "poisson":
            return self.cfg.privacy.client_sample_rate
        return 1.0

    # -- strategy wrapping -------------------------------------------------------------------

    def wrap(self, strategy: LoraStrategy) -> LoraStrategy:
        """Return ``strategy`` wrapped in client-level DP when the run asks for it (else unchanged)."""
        if self.mode != "client":
            return strategy
        return ClientLevelDP(strategy, self)

    @property
    def allows_cross_client_bounds(self) -> bool:
        """False in client mode: no defence whose bound depends on other clients' updates may run.

        The robust norm bound (a multiple of the round's median norm) and the weight cap move
        when a client is added, which rescales the other clients' updates before the DP clip:
        with 5 small and 5 clipped updates, adding one moved the released sum by 5.85 C instead
        of C. The DP clip already bounds every client's influence on every release.
        """
        return self.mode != "client"

    @property
    def admits_every_node(self) -> bool:
        """True in client mode: a node's admission may depend only on its own setup reply.

        Choosing ``num_clients`` of more connected nodes, or leaving out every node of a shared
        partition id, lets one added node push an honest one out: two clients' contributions
        would change, a sensitivity of 2C for a mechanism accounted at C.
        """
        return self.mode == "client"

    @property
    def releases_every_round(self) -> bool:
        """True in client mode: a round is released (and charged) whatever the number of valid updates."""
        return self.mode == "client"

    # -- sampling and dispatch ---------------------------------------------------------------

    def sample_clients(self, nodes: Sequence[int], k: int, rng: random.Random) -> list[int]:
        """Return the nodes that train this round.

        Poisson sampling (client-level DP with ``client_sampling = "poisson"``) includes each
        node independently with probability q; otherwise all nodes or a fixed-size sample of ``k``.
        Under DP the draw uses the OS CSPRNG, not ``rng`` (seeded from the run seed, which
        every client knows): who took part must not be predictable. ``rng`` serves runs
        without DP, which stay reproducible.
        """
        if self.mode != "none":
            rng = self._sampler
        if self.mode == "client" and self.sampling == "poisson":
            return sorted(sample_clients(list(nodes), self.cfg.privacy.client_sample_rate, "poisson", rng))
        if k == 0 or k >= len(nodes):
            return list(nodes)
        return sorted(rng.sample(list(nodes), k))

    def budget_stop(self, rnd: int) -> str | None:
        """Return why the run must stop before round ``rnd`` (client mode, budget spent), else None."""
        if self.mode != "client" or self.target is None:
            return None
        ledger = self.ledgers[CLIENT_LEVEL_KEY]
        label = ledger.next_round(self.run_id, rnd)
        entry = LedgerEntry(label, self.sigma, self._client_rate(), 1, self.sampling, self.run_id)
        if not would_exceed(ledger, entry, self.target, self.cfg.privacy.accountant):
            return None
        spent = ledger.live_epsilon(self.cfg.privacy.accountant)[0]
        return (
            f"stopping before round {rnd}: one more client-level DP release would take ε from "
            f"{spent:.3f} past the target {self.target:g} (δ={self.cfg.privacy.delta:g}, "
            f"{self.cfg.privacy.accountant}); the global adapter of the last completed round is exported. "
            "Raise privacy.epsilon or plan fewer rounds"
        )

    def before_dispatch(self, rnd: int, nodes: Mapping[int, tuple[int, int]], run_id: str = "") -> None:
        """Persist a pending entry for every party that may spend budget in round ``rnd``.

        Call it before the round's messages leave. ``nodes`` maps each node sent to onto
        ``(partition id, example count)`` from its setup reply; ``run_id`` is Flower's run id
        (:func:`grid_run_id`), the ``run`` of every entry spent in this run.
        """
        self.run_id, self.round = run_id, rnd
        if self.mode == "none":
            return
        if self.mode == "client":
            self.pending = [{"key": CLIENT_LEVEL_KEY, "run": run_id, "round": rnd}]
        else:
            self.pending = [
                {"key": client_key(pid), "run": run_id, "round": rnd, "num_examples": int(n)}
                for pid, n in (nodes[node] for node in sorted(nodes))
            ]
        self._save()

    def client_conf(self, partition_id: int, node: int) -> dict[str, str]:
        """Round-config entries for one client: the server's copy of its ledger (record-level DP).

        A client whose own state was lost (a restarted simulation) gets back what it spent, and
        the server's worst-case charges, from this copy; a client only ever ADDS entries from it.
        The copy goes only to the node the partition is bound to (the first node that reported
        its ledger in this run): its σ and q disclose the client's data size, so a node that
        claims another's partition id gets nothing.
        """
        key = client_key(partition_id)
        ledger = self.ledgers.get(key)
        if self.mode != "record" or ledger is None or self._owners.get(key, node) != node:
            return {}
        return {"privacy-ledger": ledger.to_json()}

    def observe_reply(self, node: int, partition_id: int, reply: Message) -> None:
        """Merge the client's ledger from ``reply`` into the server's copy (record-level DP).

        The copy is keyed by the partition the server bound ``node`` to at setup, and it only
        grows (union keyed by ``(run, round)``), so one client cannot overwrite another's ledger
        nor lower its own recorded spending. The one exception is the server's own worst-case
        charges, which a client's ``complete`` (persistent) ledger disproves.

        Raises
        ------
        LedgerError
            (a ``ValueError``) when the ledger does not parse, names another client, or the
            partition is already bound to another node: the reply must be rejected.
        """
        if self.mode != "record" or "privacy" not in reply.content.config_records:
            return
        text = str(reply.content["privacy"].get("ledger", "{}"))
        if text.strip() in ("", "{}"):
            return
        key = client_key(partition_id)
        reported_before = key in self._owners
        owner = self._owners.setdefault(key, node)
        if owner != node:
            raise LedgerError(
                f"node {node} replied for {key!r}, which node {owner} holds in this run; two nodes claim "
                "the same partition-id (give every SuperNode its own)"
            )
        ledger = parse_received(text)  # bounded: size, entries, distinct (σ, q) pairs
        if (ledger.client_id, ledger.unit) != (key, "record"):
            raise LedgerError(
                f"node {node} (bound to {key!r}) sent the {ledger.unit} ledger of {ledger.client_id!r}; "
                "a node may only report its own record-level ledger"
            )
        old = self.ledgers.get(key)
        if reported_before and old is not None:
            known = {e.key for e in old.entries}
            new = sum(e.key not in known for e in ledger.entries)
            if new > MAX_NEW_ENTRIES_PER_REPLY:
                raise LedgerError(
                    f"the ledger adds {new} entries in one round (at most {MAX_NEW_ENTRIES_PER_REPLY} after "
                    "a node's first report of the run); a client records one entry per round it trains"
                )
        if old is not None and ledger.complete:  # the client's persistent ledger disproves what it lacks
            old = old.without_pending()
        # The server's copy is authoritative for what it already holds: an incoming ledger only adds
        # rounds (and confirms pending worst-case charges); it cannot re-weigh a confirmed entry.
        self.ledgers[key] = ledger if old is None else old.union(ledger)
        self._observed.add(key)

    # -- client-level DP release -------------------------------------------------------------

    def release(self, updates: Sequence[Mapping[str, torch.Tensor]], template: AdapterState) -> AdapterState:
        """Clip, sum and noise ``updates`` (one DP-FedAvg step); charge it once per round.

        Raises
        ------
        PrivacyBudgetExceeded
            If the step would take the run past its target (the loop checks
            :meth:`budget_stop` first, so this is a last line of defence).
        """
        ledger = self.ledgers[CLIENT_LEVEL_KEY]
        rnd = self.round or ledger.next_round(self.run_id, 1)
        entry = LedgerEntry(
            ledger.next_round(self.run_id, rnd),
            self.sigma,
            self._client_rate(),
            1,
            self.sampling,
            self.run_id,
        )
        charge = self._released_round != rnd
        if (
            charge
            and self.target is not None
            and would_exceed(ledger, entry, self.target, self.cfg.privacy.accountant)
        ):
            raise PrivacyBudgetExceeded(self.budget_stop(rnd) or f"round {rnd} would exceed the ε target")
        m = expected_clients(self.cfg.federation.num_clients, self._client_rate(), self.sampling)
        noisy, norms = privatize_updates(
            updates,
            clip_norm=self.cfg.privacy.clip_norm,
            noise_multiplier=self.sigma,
            expected_clients=m,
            template=template,
            generator=self.noise,
        )
        log.info(
            "round %s: client-level DP over %d updates, pre-clip norms %s",
            rnd,
            len(updates),
            [round(n, 4) for n in norms],
        )
        if charge:  # a re-aggregation of the same round (leaving an offender out) is not a second release
            self.ledgers[CLIENT_LEVEL_KEY] = ledger.append(entry)
            self._released_round = rnd
        return noisy

    # -- rounds, checkpoints, resume ---------------------------------------------------------

    def round_summary(self, rnd: int) -> dict[str, Any]:
        """Privacy numbers for the round's metrics line; closes the round's pending entries and saves."""
        if self.mode == "none":
            return {}
        if rnd == self.round:
            # A party whose ledger did not come back this round (timeout, crash, malformed reply) may
            # still have spent budget: its pending entry is charged as worst case until a later ledger
            # of the party's confirms or (a complete one) disproves it.
            unconfirmed = [p for p in self.pending if p["key"] not in self._observed]
            if self.mode == "record" and unconfirmed:
                self.charge_pending(unconfirmed)
            self.pending = []
            self._observed = set()
        self._save()
        eps = {  # bounded cost: a ledger of many distinct (σ, q) pairs is shown with the RDP bound
            cid: ledger.live_epsilon(self.cfg.privacy.accountant)[0]
            for cid, ledger in self.ledgers.items()
            if ledger.entries
        }
        return {"dp_epsilon_max": max(eps.values()) if eps else 0.0, "dp_epsilon": eps}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: every ledger as JSON (and no generator state: see __init__)."""
        return {"ledgers": {cid: ledger.to_json() for cid, ledger in self.ledgers.items()}}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Merge the checkpoint's ledgers into the ones already loaded (a union: nothing is forgotten).

        A checkpoint of an older version may hold ``"noise_rng"``: it is ignored on purpose.
        """
        for text in data.get("ledgers", {}).values():
            self._merge(PrivacyLedger.from_json(text))

    def _merge(self, ledger: PrivacyLedger) -> None:
        old = self.ledgers.get(ledger.client_id)
        self.ledgers[ledger.client_id] = ledger if old is None else old.union(ledger)

    def _resume_from_run_file(self) -> None:
        """Union the run file's ledgers in, charge its pending rounds, and count the resume."""
        doc = load_run_file(self.run_dir)
        if not doc:
            return
        for data in doc.get("ledgers", {}).values():
            self._merge(PrivacyLedger.from_dict(data))
        self.resumes = list(doc.get("resumes", []))
        charged = self.charge_pending(doc.get("pending", []))
        last = max((e.round for led in self.ledgers.values() for e in led.entries), default=0)
        self.resumes.append({"after_round": last, "charged": charged})
        if charged:
            print(
                f"privacy: charged {charged} worst-case round(s) that were in flight when the run stopped",
                flush=True,
            )
        self._save()

    def charge_pending(self, pending: Sequence[Mapping[str, Any]]) -> int:
        """Charge every pending entry as a worst-case round unless its ledger already holds the key.

        Record level: the client's last recorded round (σ, q, steps), or, for a client with no
        record yet, the σ, q and planned steps it calibrates from the run config. Client level:
        one release. Returns how many entries were charged.
        """
        charged = 0
        for item in pending:
            key, run, rnd = str(item["key"]), str(item.get("run", "")), int(item["round"])
            ledger = self.ledgers.get(key) or self._new_ledger(key)
            if any(e.key == (run, rnd) for e in ledger.entries):
                continue  # the party's own record of the round is already here
            entry = self._worst_case(ledger, run, rnd, int(item.get("num_examples", 0)))
            self.ledgers[key] = ledger.union(replace(ledger, entries=(entry,)))
            charged += 1
        return charged

    def _new_ledger(self, key: str) -> PrivacyLedger:
        p = self.cfg.privacy
        unit = "client" if key == CLIENT_LEVEL_KEY else "record"
        clip = p.clip_norm if unit == "client" else p.max_grad_norm
        return PrivacyLedger(key, unit, p.delta, clip, target_epsilon=self.target)  # type: ignore[arg-type]

    def _worst_case(self, ledger: PrivacyLedger, run: str, rnd: int, num_examples: int) -> LedgerEntry:
        if ledger.unit == "client":
            return LedgerEntry(rnd, self.sigma, self._client_rate(), 1, self.sampling, run, pending=True)
        done = [e for e in ledger.entries if not e.pending]
        if done:
            last = done[-1]
            return LedgerEntry(
                rnd, last.noise_multiplier, last.sample_rate, last.steps, last.sampling, run, True
            )
        from fedlora.train import planned_steps as local_steps  # heavy import, only on this path

        p, t = self.cfg.privacy, self.cfg.train
        q = 1.0 / max(1, -(-max(1, num_examples) // t.batch_size))
        steps = local_steps(max(1, num_examples), t)
        sigma = p.noise_multiplier
        if sigma <= 0:
            total = planned_steps(self.cfg.federation.num_rounds, steps)
            sigma = calibrate_noise_multiplier(p.epsilon, p.delta, q, total, accountant=p.accountant)
        return LedgerEntry(rnd, sigma, q, steps, "poisson", run, pending=True)

    def _save(self) -> None:
        if self.mode == "none":
            return
        save_run_ledgers(self.run_dir, self.ledgers, self.facts, pending=self.pending, resumes=self.resumes)

    def write_report(self) -> dict[str, Path]:
        """Write the run's privacy ledger file and Markdown/HTML/JSON report."""
        if self.mode != "none":
            self._save()
        else:
            save_run_ledgers(self.run_dir, self.ledgers, self.facts)
        return write_report(self.run_dir)


class ClientLevelDP(StrategyWrapper):
    """DP-FedAvg (McMahan et al. 2018) around any strategy that declares ``dp_tensors``.

    As Flower's DP strategy wrappers do, the wrapper owns clipping, noise and accounting, and
    the inner strategy only sees one result: its payload plus the noisy mean update (weight
    1), so its own average of it is the release itself. Strategies whose release is not a
    linear average of the factor updates declare ``dp_tensors = None`` and are refused.
    """

    def __init__(self, inner: LoraStrategy, privacy: ServerPrivacy) -> None:
        super().__init__(inner)
        self.privacy = privacy
        self._spec: ClientSpec | None = None
        privatisable_names(inner, [])  # refuse early

    def init_state(self, template: AdapterState, clients: Sequence[ClientSpec]) -> AdapterState:
        """Delegate to the inner strategy (remembering a client shape for noise-only rounds)."""
        if clients:
            self._spec = clients[0]
        return self.inner.init_state(template, clients)

    def payload(self, state: AdapterState, client: ClientSpec) -> Payload:
        """Delegate to the inner strategy."""
        self._spec = client
        return self.inner.payload(state, client)

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Release the noisy mean of the clipped updates (possibly none); the inner strategy applies it."""
        spec = results[0].spec if results else self._spec or self._default_spec(state)
        base = self.inner.payload(state, spec).adapter
        names = privatisable_names(self.inner, list(base))
        updates = []
        for r in results:
            sent = self.inner.payload(state, r.spec).adapter
            updates.append({k: r.state[k] - sent[k] for k in names})
        noisy = self.privacy.release(updates, {k: base[k] for k in names})
        return self.inner.aggregate(
            state, [ClientResult(spec=spec, num_examples=1, state=apply_delta(base, noisy))]
        )

    def _default_spec(self, state: AdapterState) -> ClientSpec:
        # No client was sent anything in this process yet (a resumed run whose first round sampled
        # nobody): the global state's own rank (A is r x d_in) gives the shape of the noise.
        ranks = [int(v.shape[0]) for k, v in state.items() if is_lora_a(k)]
        rank = max(ranks) if ranks else self.privacy.cfg.lora.rank
        return ClientSpec(node_id=0, rank=rank, alpha=self.privacy.cfg.lora.alpha_for(rank))
