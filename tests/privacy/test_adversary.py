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
from pathlib import Path

import pytest
import torch
from privacy_models import tiny_peft_bert, token_loader

from fedlora.config import RunConfig, with_overrides
from fedlora.privacy.client_dp import ClientDPError
from fedlora.privacy.dpsgd import make_private_lora
from server.privacy import ServerPrivacy
from strategies.base import ClientResult, ClientSpec, Payload

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


def release(priv: ServerPrivacy, updates: list[torch.Tensor], rnd: int = 1) -> torch.Tensor:
    """One client-level DP release of ``updates`` (one tensor each); return the noisy mean update."""
    zero = {NAME: torch.zeros(SHAPE)}
    payloads = {i: Payload(adapter=zero) for i in range(len(updates))}
    results = [
        ClientResult(spec=ClientSpec(i, 4, 8.0), num_examples=1, state={NAME: u})
        for i, u in enumerate(updates)
    ]
    out = priv.process_updates(results, payloads, rnd)
    return out[0].state[NAME]


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
    assert float(noise.var()) == pytest.approx(std**2, rel=0.1)
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
