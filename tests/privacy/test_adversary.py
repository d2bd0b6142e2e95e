"""The privacy guarantees played against the adversaries they name (docs/privacy.md, "Threat model").

* Client-level DP protects a client against the OTHER clients and outsiders: a client that
  knows everything a client sees (run config with its seed, payloads, the checkpoint a
  resumed run reads) must not be able to subtract the server's noise, nor predict who takes
  part in a round.
* Record-level DP protects a client's records against the SERVER: the server, which sends the
  seed, must not be able to rebuild the Poisson batches or the DP-SGD noise.
* Ledgers: a client's own ledger decides whether it trains; the server (or another client)
  can only add to it.
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from privacy_models import tiny_peft_bert, token_loader

from clients.node import node_settings
from clients.privacy import ClientPrivacy
from fedlora.config import RunConfig, with_overrides
from fedlora.privacy.client_dp import ClientDPError
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.privacy.ledger import LedgerError, PrivacyLedger
from server.privacy import ServerPrivacy
from strategies.base import ClientResult, ClientSpec
from strategies.registry import create

NAME = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
SHAPE = (64, 64)  # 4096 noise coordinates: the residual's variance is estimated to a few percent


def client_cfg(**over) -> RunConfig:
    base = {
        "privacy.mode": "client",
        "privacy.noise_multiplier": 1.0,
        "privacy.clip_norm": 1.0,
        "privacy.client_sampling": "fixed",
        "federation.num_clients": 4,
        "federation.strategy": "fedit",
        "federation.seed": 0,
    }
    return with_overrides(RunConfig(), {**base, **over})


def release(priv: ServerPrivacy, updates: list[torch.Tensor]) -> torch.Tensor:
    """One client-level DP round of FedIT wrapped by the server's DP; return the released mean update."""
    strategy = priv.wrap(create("fedit"))
    state = {NAME: torch.zeros(SHAPE)}
    results = [
        ClientResult(spec=ClientSpec(i, 4, 8.0), num_examples=1, state={NAME: u})
        for i, u in enumerate(updates)
    ]
    return strategy.aggregate(state, results)[NAME] - state[NAME]


def known_seed_noise(seed: int, checkpoint: dict) -> list[torch.Tensor]:
    """Every noise draw a client could regenerate: from run seeds, or a generator state in the checkpoint."""
    guesses = []
    for s in (seed, seed + 7919, seed + 1):
        g = torch.Generator().manual_seed(s)
        guesses.append(torch.randn(SHAPE, generator=g, dtype=torch.float64))
    for value in checkpoint.values():
        if isinstance(value, torch.Tensor) and value.dtype == torch.uint8:  # a saved generator state
            g = torch.Generator()
            g.set_state(value)
            guesses.append(torch.randn(SHAPE, generator=g, dtype=torch.float64))
    return guesses


def test_other_clients_cannot_subtract_the_client_level_noise(tmp_path: Path):
    cfg = client_cfg()
    priv = ServerPrivacy(cfg, tmp_path)
    # What a client sees: the run config (with the seed) and the checkpoint a resumed run reads.
    checkpoint = priv.state_dict()
    resumed = ServerPrivacy(cfg, tmp_path)
    resumed.load_state_dict(checkpoint)
    g = torch.Generator().manual_seed(5)
    updates = [0.01 * torch.randn(SHAPE, generator=g) for _ in range(4)]
    true_sum = torch.stack(updates).double().sum(0)
    std = cfg.privacy.noise_multiplier * cfg.privacy.clip_norm
    m = cfg.federation.num_clients
    released = release(resumed, updates).double()
    noise = released * m - true_sum  # exactly std * (the server's Gaussian draw)
    assert float(noise.var()) == pytest.approx(std**2, rel=0.15)  # 4096 draws: 7 standard errors
    for guess in known_seed_noise(cfg.federation.seed, checkpoint):
        residual = noise - std * guess
        # A correct guess leaves ~0; an independent one leaves twice the noise variance.
        assert float(residual.var()) > 0.9 * std**2, "the released sum was reconstructed"


def test_no_generator_state_reaches_the_checkpoint_and_each_process_draws_fresh_noise(tmp_path: Path):
    cfg = client_cfg()
    a, b = ServerPrivacy(cfg, tmp_path), ServerPrivacy(cfg, tmp_path)
    state = a.state_dict()
    assert set(state) == {"ledgers"} and not any(isinstance(v, torch.Tensor) for v in state.values())
    b.load_state_dict(state)
    zero = [torch.zeros(SHAPE)] * 2
    assert not torch.equal(release(a, zero), release(b, zero))  # same config and checkpoint


def test_client_sampling_under_dp_is_not_predictable_from_the_run_seed(tmp_path: Path):
    cfg = client_cfg(**{"privacy.client_sampling": "poisson", "privacy.client_sample_rate": 0.5})
    priv = ServerPrivacy(cfg, tmp_path)
    nodes = list(range(16))
    server_rng = random.Random(cfg.federation.seed)  # what the loop passes in
    attacker_rng = random.Random(cfg.federation.seed)
    drawn = [priv.sample_clients(nodes, 0, server_rng) for _ in range(10)]
    predicted = [sorted(n for n in nodes if attacker_rng.random() < 0.5) for _ in range(10)]
    assert drawn != predicted  # each round 2^-16 to guess blindly, 2^-160 for all ten


def test_fixed_size_client_sampling_of_a_subset_is_refused_with_a_fix(tmp_path: Path):
    cfg = client_cfg(**{"federation.clients_per_round": 2})
    with pytest.raises(ClientDPError, match=r"client_sampling = 'poisson'.*client_sample_rate = 0.5"):
        ServerPrivacy(cfg, tmp_path)
    ServerPrivacy(client_cfg(**{"federation.clients_per_round": 4}), tmp_path)  # every client: fine


def _batches_and_noise(sampling_seed_known: int) -> tuple[list[list[int]], torch.Tensor]:
    """Wrap the same model, optimizer and seeded loader as a server-predictable client would."""
    torch.manual_seed(sampling_seed_known)  # even the global RNG is identical between the two runs
    model = tiny_peft_bert()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1.0)
    private = make_private_lora(
        model, opt, token_loader(32, 4, seed=sampling_seed_known), noise_multiplier=1.0, max_grad_norm=1.0
    )
    batches = [list(b) for b in private.data_loader.batch_sampler]
    # One step on a fixed batch with zero loss: the parameter change is the noise alone.
    before = torch.cat([p.detach().flatten().clone() for p in params])
    ids, mask, labels = token_loader(4, 4, seed=9).dataset.tensors
    out = private.model(input_ids=ids, attention_mask=mask, labels=labels)
    (out.logits.sum() * 0.0).backward()
    private.optimizer.step()
    noise = torch.cat([p.detach().flatten() for p in params]) - before
    private.release()
    return batches, noise


def test_server_cannot_rebuild_poisson_batches_or_dpsgd_noise_from_the_seed_it_sent():
    batches1, noise1 = _batches_and_noise(7)
    batches2, noise2 = _batches_and_noise(7)
    assert float(noise1.abs().max()) > 0 and float(noise2.abs().max()) > 0
    assert batches1 != batches2, "Poisson batches follow the seed the server knows"
    assert not torch.allclose(noise1, noise2), "DP-SGD noise follows a seed the server knows"


# -- ledgers nobody else can rewrite ---------------------------------------------------------------


def record_cfg(**over) -> RunConfig:
    base = {
        "privacy.mode": "record",
        "privacy.noise_multiplier": 1.0,
        "privacy.accountant": "rdp",
        "federation.num_clients": 2,
        "train.batch_size": 8,
    }
    return with_overrides(RunConfig(), {**base, **over})


def node_context(state_dir: Path, pid: int = 0) -> tuple[Context, dict]:
    node_config = {"partition-id": pid, "num-partitions": 2, "state-dir": str(state_dir)}
    return Context(
        run_id=7, node_id=10 + pid, node_config=node_config, state=RecordDict(), run_config={}
    ), node_config


def test_a_forged_server_copy_cannot_make_a_declining_client_train(tmp_path: Path):
    own = PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1.0, 0.2, 50).record(2, 1.0, 0.2, 50)
    own.save(tmp_path / "privacy_ledger.json")  # the node's own file, as a SuperNode with state-dir keeps it
    nxt = own.record(3, 1.0, 0.2, 50)
    target = (own.epsilon("rdp") + nxt.epsilon("rdp")) / 2  # the client must decline round 3
    cfg = record_cfg(**{"privacy.epsilon": target})
    context, node_config = node_context(tmp_path)
    node = node_settings(cfg, node_config)
    honest = ClientPrivacy.for_round(cfg, node, context, 40, 50, server_round=3)
    assert honest.declined
    # The server sends a "copy" with more steps, all at huge σ: ε near 0 if the client believed it.
    forged = PrivacyLedger("client-0", "record", 1e-5, 1.0)
    for r in range(1, 11):
        forged = forged.record(r, 1000.0, 0.2, 500)
    fooled = ClientPrivacy.for_round(cfg, node, context, 40, 50, server_round=3, server_copy=forged.to_json())
    assert fooled.declined, "a forged server copy made a client train past its budget"
    assert fooled.ledger is not None and fooled.ledger.epsilon("rdp") >= own.epsilon("rdp")


class Reply:
    """What the server's observe_reply reads of a reply message: its content records."""

    def __init__(self, ledger_text: str) -> None:
        self.content = RecordDict({"privacy": ConfigRecord({"ledger": ledger_text})})


def test_one_client_cannot_overwrite_or_erase_another_clients_ledger(tmp_path: Path):
    priv = ServerPrivacy(record_cfg(), tmp_path)
    victim = PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1.0, 0.2, 50)
    priv.observe_reply(11, 0, Reply(victim.to_json()))  # node 11 holds partition 0
    spent = priv.ledgers["client-0"].epsilon("rdp")
    assert spent > 0
    blank = PrivacyLedger("client-0", "record", 1e-5, 1.0)  # "client-0 has spent nothing"
    with pytest.raises(ValueError, match="client-0"):
        priv.observe_reply(12, 1, Reply(blank.to_json()))  # node 12 holds partition 1
    with pytest.raises(ValueError, match="client-0"):
        priv.observe_reply(12, 0, Reply(blank.to_json()))  # ... and cannot claim partition 0 either
    priv.observe_reply(11, 0, Reply(blank.to_json()))  # even the owner only adds: nothing is forgotten
    assert priv.ledgers["client-0"].epsilon("rdp") == spent


def test_a_client_cannot_reweigh_its_own_confirmed_entries_in_the_servers_copy(tmp_path: Path):
    # Reported ε 3.60 -> 0.10 before: the incoming ledger's entry replaced the confirmed one.
    priv = ServerPrivacy(record_cfg(), tmp_path)
    honest = PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1.0, 0.2, 50).record(2, 1.0, 0.2, 50)
    priv.observe_reply(11, 0, Reply(honest.to_json()))
    spent = priv.ledgers["client-0"].epsilon("rdp")
    reweighed = (
        PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1000.0, 0.2, 1).record(2, 1000.0, 0.2, 1)
    )
    priv.observe_reply(11, 0, Reply(replace(reweighed, complete=True).to_json()))
    assert priv.ledgers["client-0"].epsilon("rdp") == spent
    assert [e.noise_multiplier for e in priv.ledgers["client-0"].entries] == [1.0, 1.0]


def test_a_node_claiming_anothers_partition_does_not_receive_its_ledger_copy(tmp_path: Path):
    # σ and q in the copy disclose the owner's data size: only the bound node gets it.
    priv = ServerPrivacy(record_cfg(), tmp_path)
    own = PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1.0, 0.2, 50)
    priv.observe_reply(11, 0, Reply(own.to_json()))  # node 11 holds partition 0
    assert "privacy-ledger" in priv.client_conf(0, 11)
    assert priv.client_conf(0, 12) == {}  # node 12 claims partition 0 too: nothing


def test_a_round_whose_ledger_never_came_back_is_charged_as_worst_case(tmp_path: Path):
    # Reported ε 2.53 against 2.87 spent before: a reply that missed the timeout dropped the round.
    priv = ServerPrivacy(record_cfg(), tmp_path)
    first = PrivacyLedger("client-0", "record", 1e-5, 1.0).record(1, 1.0, 0.2, 50, run="7")
    priv.before_dispatch(1, {11: (0, 40)}, run_id="7")
    priv.observe_reply(11, 0, Reply(first.to_json()))
    priv.round_summary(1)
    assert priv.ledgers["client-0"].rounds == [1]
    priv.before_dispatch(2, {11: (0, 40), 12: (1, 40)}, run_id="7")  # round 2: node 11 never answers
    priv.round_summary(2)
    charged = priv.ledgers["client-0"]
    assert charged.rounds == [1, 2] and charged.pending_rounds == [("7", 2)]
    assert charged.epsilon("rdp") > first.epsilon("rdp")
    assert priv.ledgers["client-1"].pending_rounds == [("7", 2)]  # never heard of: planned σ, q, steps
    # A later, complete ledger of the client's own confirms (or disproves) the charge.
    confirmed = replace(first.record(2, 1.0, 0.2, 50, run="7"), complete=True)
    priv.before_dispatch(3, {11: (0, 40)}, run_id="7")
    priv.observe_reply(11, 0, Reply(confirmed.to_json()))
    priv.round_summary(3)
    assert priv.ledgers["client-0"].pending_rounds == [] and priv.ledgers["client-0"].rounds == [1, 2]


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"client_id": "client-0"}', '{"entries": 5}'])
def test_a_ledger_that_does_not_parse_is_a_rejection_not_a_crash(tmp_path: Path, text: str):
    priv = ServerPrivacy(record_cfg(), tmp_path)
    with pytest.raises(LedgerError):  # a ValueError: the round loop rejects the reply with this reason
        priv.observe_reply(11, 0, Reply(text))


# -- what a DP client sends ------------------------------------------------------------------------


def test_a_dp_client_round_sends_only_what_the_guarantee_covers(task_identity, tmp_path: Path):
    from flwr.app import Message

    from clients.app import app
    from fedlora.models import adapter_state, get_lora_model, init_adapter_state
    from fedlora.protocol import TRAIN, encode_arrays

    over = {
        "data.num_train": 80,
        "data.num_test": 20,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "federation.num_clients": 2,
        "lora.rank": 4,
        "privacy.mode": "record",
        "privacy.noise_multiplier": 1.0,
        "privacy.epsilon": 50.0,
    }
    cfg = with_overrides(RunConfig(), over)
    node_config = {"partition-id": 0, "num-partitions": 2, "dp-epsilon": 40.0, "state-dir": str(tmp_path)}
    context = Context(run_id=5, node_id=10, node_config=node_config, state=RecordDict(), run_config={})
    start = init_adapter_state(adapter_state(get_lora_model("minilm", "classification", 4, 4, 8.0), 4), 0)
    conf = {
        "run-config": cfg.to_json(),
        "labels": '["person", "animal", "vehicle", "robot"]',
        "round": 1,
        "rank": 4,
        "alpha": 8.0,
        "seed": 0,
        "train-a": True,
    }
    msg = Message(
        RecordDict({"adapter": encode_arrays(start), "config": ConfigRecord(conf)}),
        dst_node_id=10,
        message_type=TRAIN,
    )
    reply = app(msg, context)
    sent = set(reply.content["metrics"])
    assert not sent & {"train-loss", "local-val-loss", "local-val-accuracy"}, (
        "un-noised metrics left the node"
    )
    assert "dp-epsilon" in sent and "num-examples" in sent  # accounting and the strategy's weights stay
    ledger = PrivacyLedger.from_json(str(reply.content["privacy"]["ledger"]))
    assert [e.key for e in ledger.entries] == [("5", 1)]  # entries carry the run id
    assert ledger.target_epsilon == 40.0  # the node's own budget, not the run's 50
