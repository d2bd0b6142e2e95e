"""Server-side privacy: client sampling, client-level DP-FedAvg, run ledgers and the report.

Record-level DP (``privacy.mode = "record"``) runs on clients; the server only collects each
client's ledger from its replies and writes ``privacy/ledger.json`` after every round.
Client-level DP (``"client"``) runs here: the round's updates are clipped to
``privacy.clip_norm``, summed, noised with σ·C and divided by the expected number of clients
(:func:`fedlora.privacy.client_dp.privatize_updates`); the ledger gets one step per round
with the client sampling rate actually used (fixed-size sampling claims no amplification).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message

from fedlora.adapters import apply_delta
from fedlora.config import RunConfig
from fedlora.privacy.calibrate import calibrate_noise_multiplier
from fedlora.privacy.client_dp import (
    check_client_sampling,
    dp_tensor_names,
    expected_clients,
    privatize_updates,
    require_client_dp,
    sample_clients,
)
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.randomness import entropy_generator, system_random
from fedlora.privacy.report import write_report
from fedlora.privacy.runfile import CLIENT_LEVEL_KEY, RunFacts, save_run_ledgers
from strategies.base import ClientResult, Payload

log = logging.getLogger(__name__)


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
        if p.mode == "client":
            require_client_dp(cfg.federation.strategy)
            check_client_sampling(
                p.client_sampling, cfg.federation.clients_per_round, cfg.federation.num_clients
            )
            q = self._client_rate()
            if self.sigma <= 0:
                self.sigma = calibrate_noise_multiplier(
                    p.epsilon, p.delta, q, cfg.federation.num_rounds, accountant=p.accountant
                )
            self.ledgers[CLIENT_LEVEL_KEY] = PrivacyLedger(
                client_id=CLIENT_LEVEL_KEY, unit="client", delta=p.delta, max_grad_norm=p.clip_norm
            )
        # DP draws come from OS entropy, fresh in every process (so after every resume), and are
        # never checkpointed: the run seed is in every client's run config.
        self.noise = entropy_generator()
        self._sampler = system_random()
        self.facts = RunFacts.create(
            p.mode,
            sampling=self.sampling if p.mode != "none" else None,
            accountant=p.accountant if p.mode != "none" else "rdp",
            target_epsilon=p.epsilon or None if p.mode != "none" else None,
            delta=p.delta if p.mode != "none" else None,
            strategy=cfg.federation.strategy,
        )

    def _client_rate(self) -> float:
        # Calibrate with exactly the q the ledger accounts: fixed-size sampling is only allowed
        # with every client in every round (check_client_sampling), which is q = 1.
        if self.cfg.privacy.client_sampling == "poisson":
            return self.cfg.privacy.client_sample_rate
        return 1.0

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

    def client_conf(self, partition_id: int) -> dict[str, str]:
        """Round-config entries for one client: the server's copy of its ledger (record-level DP).

        A client whose own state was lost (a restarted simulation) continues from this copy;
        a client keeps whichever ledger has spent more, so the server cannot lower its ε.
        """
        ledger = self.ledgers.get(f"client-{partition_id}")
        return {"privacy-ledger": ledger.to_json()} if self.mode == "record" and ledger is not None else {}

    def observe_reply(self, node: int, partition_id: int, reply: Message) -> None:
        """Keep the client's latest privacy ledger (record-level DP)."""
        if self.mode != "record" or "privacy" not in reply.content.config_records:
            return
        text = str(reply.content["privacy"].get("ledger", "{}"))
        if text.strip() in ("", "{}"):
            return
        ledger = PrivacyLedger.from_json(text)
        self.ledgers[ledger.client_id] = ledger

    def process_updates(
        self, results: list[ClientResult], payloads: Mapping[int, Payload], rnd: int
    ) -> list[ClientResult]:
        """Apply client-level DP to the round's results (identity in other modes).

        Returns one result holding ``payload + noisy mean update`` with weight 1: the strategy's
        average of it is the DP-FedAvg release itself.
        """
        if self.mode != "client":
            return results
        first = payloads[results[0].spec.node_id]
        names = dp_tensor_names(self.cfg.federation.strategy, list(first.adapter))
        updates = [{k: r.state[k] - payloads[r.spec.node_id].adapter[k] for k in names} for r in results]
        m = expected_clients(
            len(payloads) if self.sampling == "fixed" else self.cfg.federation.num_clients,
            self._client_rate() if self.sampling == "poisson" else 1.0,
            self.sampling,
        )
        noisy, norms = privatize_updates(
            updates,
            clip_norm=self.cfg.privacy.clip_norm,
            noise_multiplier=self.sigma,
            expected_clients=m,
            template=updates[0],
            generator=self.noise,
        )
        log.info(
            "round %s: client-level DP over %d updates, pre-clip norms %s",
            rnd,
            len(updates),
            [round(n, 4) for n in norms],
        )
        ledger = self.ledgers[CLIENT_LEVEL_KEY]
        self.ledgers[CLIENT_LEVEL_KEY] = ledger.record(
            rnd, self.sigma, self._client_rate(), 1, sampling=self.sampling
        )
        return [ClientResult(spec=results[0].spec, num_examples=1, state=apply_delta(first.adapter, noisy))]

    def round_summary(self, rnd: int) -> dict[str, Any]:
        """Privacy numbers for the round's metrics line; also rewrites the run ledger file."""
        if self.mode == "none":
            return {}
        save_run_ledgers(self.run_dir, self.ledgers, self.facts)
        eps = {
            cid: ledger.epsilon(self.cfg.privacy.accountant)
            for cid, ledger in self.ledgers.items()
            if ledger.entries
        }
        return {"dp_epsilon_max": max(eps.values()) if eps else 0.0, "dp_epsilon": eps}

    def state_dict(self) -> dict[str, Any]:
        """Checkpointable state: every ledger as JSON (and no generator state: see __init__)."""
        return {"ledgers": {cid: ledger.to_json() for cid, ledger in self.ledgers.items()}}

    def load_state_dict(self, data: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        # A checkpoint of an older version may hold "noise_rng": it is ignored on purpose.
        self.ledgers = {cid: PrivacyLedger.from_json(text) for cid, text in data.get("ledgers", {}).items()}

    def write_report(self) -> dict[str, Path]:
        """Write the run's privacy ledger file and Markdown/HTML/JSON report."""
        save_run_ledgers(self.run_dir, self.ledgers, self.facts)
        return write_report(self.run_dir)
