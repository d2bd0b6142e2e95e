"""Local training and evaluation of a LoRA adapter (one client, one round).

AdamW over the trainable tensors only, linear warm-up then constant learning rate,
gradient-norm clipping, bf16/fp16 autocast on GPU. With differential privacy a
``wrap`` callback (see :mod:`fedlora.privacy.dpsgd`) replaces model, optimiser and loader by
their Opacus counterparts; per-sample clipping then replaces the global clipping here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedlora.config import TrainConfig

Wrap = Callable[
    [torch.nn.Module, torch.optim.Optimizer, DataLoader],
    tuple[torch.nn.Module, torch.optim.Optimizer, DataLoader],
]


def resolve_device(name: str) -> torch.device:
    """Return the device for ``name``; ``auto`` picks cuda, then mps, then cpu.

    Raises
    ------
    ValueError
        If an explicitly requested accelerator is not available.
    """
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("train.device = 'mps' but MPS is not available; use 'auto' or 'cpu'")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """Return the autocast dtype (None = full fp32). ``auto`` is bf16 on a GPU that has it, else fp32."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did."""

    loss: float
    steps: int
    examples_seen: int
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Loss and accuracy (token accuracy for causal LM) on a data set."""

    loss: float
    accuracy: float
    examples: int


def planned_steps(num_examples: int, cfg: TrainConfig) -> int:
    """Return the optimiser steps of one local round: ``local_steps`` or epochs x batches."""
    if cfg.local_steps > 0:
        return cfg.local_steps
    return max(1, math.ceil(cfg.local_epochs * num_examples / cfg.batch_size))


def _batches(loader: DataLoader) -> Iterator[Any]:
    while True:
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError("the training data loader produced no batches; the client has no training data")


def _forward_loss(model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    ids, mask, labels = (t.to(device) for t in batch)
    return model(input_ids=ids, attention_mask=mask, labels=labels).loss


def train_local(
    model: torch.nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    seed: int,
    wrap: Wrap | None = None,
    steps: int | None = None,
) -> TrainResult:
    """Train ``model``'s trainable parameters on ``dataset`` for one local round.

    ``steps`` defaults to :func:`planned_steps`. ``wrap`` (DP) receives model, optimiser
    and loader and returns the versions to train with.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check the LoRA target modules")
    n_steps = steps if steps is not None else planned_steps(len(dataset), cfg)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_model: torch.nn.Module = model
    if wrap is not None:
        train_model, optimizer, loader = wrap(model, optimizer, loader)
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    amp = autocast_dtype(device, cfg.precision)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    train_model.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    batches = _batches(loader)
    for _ in range(n_steps):
        batch = next(batches)
        optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
        with ctx:
            loss = _forward_loss(train_model, batch, device)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()}; lower train.lr or check the data")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if wrap is None and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        total += float(loss.detach())
        seen += len(batch[0])
    return TrainResult(
        loss=total / max(1, n_steps), steps=n_steps, examples_seen=seen, seconds=time.perf_counter() - t0
    )


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, dataset: Dataset, task: str, device: torch.device, batch_size: int = 64
) -> EvalResult:
    """Return mean loss and accuracy of ``model`` on ``dataset`` (token accuracy for causal LM)."""
    if len(dataset) == 0:  # type: ignore[arg-type]
        return EvalResult(loss=float("nan"), accuracy=float("nan"), examples=0)
    was_training = model.training
    model.eval()
    loss_sum, correct, count, n = 0.0, 0, 0, 0
    for ids, mask, labels in DataLoader(dataset, batch_size=batch_size):
        ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss_sum += float(out.loss) * len(ids)
        n += len(ids)
        if task == "classification":
            correct += int((out.logits.argmax(-1) == labels).sum())
            count += len(labels)
        else:
            # Position t predicts token t+1; score only response tokens.
            pred = out.logits[:, :-1].argmax(-1)
            target = labels[:, 1:]
            keep = target != -100
            correct += int((pred[keep] == target[keep]).sum())
            count += int(keep.sum())
    model.train(was_training)
    return EvalResult(loss=loss_sum / n, accuracy=correct / max(1, count), examples=n)
