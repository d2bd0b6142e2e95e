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
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from fedlora.config import TrainConfig
from fedlora.data.encode import IGNORE_INDEX

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
    """Loss and accuracy (token accuracy for causal LM) on a data set, plus task-specific extras."""

    loss: float
    accuracy: float
    examples: int
    extras: dict[str, float] = field(default_factory=dict)


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


def causal_example_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return each example's mean next-token loss over its own response tokens, shape (batch,).

    ``logits`` (batch, seq, vocab) predict position t+1 from position t; ``labels`` (batch, seq)
    hold -100 where no loss is taken (prompt, padding). An example without response tokens
    has loss 0 (no gradient). Each value depends on its own example only, which per-sample
    clipping under DP needs: a token mean over the whole batch would weight an example's
    gradient by its share of the batch's tokens, so its batch-mates would change it.
    """
    pred = logits[:, :-1].float()
    target = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        pred.reshape(-1, pred.shape[-1]), target.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none"
    ).view(target.shape)
    count = (target != IGNORE_INDEX).sum(dim=1)
    return tok.sum(dim=1) / count.clamp(min=1)


def example_losses(
    model: torch.nn.Module, batch: Any, device: torch.device, trim: bool = True
) -> torch.Tensor:
    """Return the per-example training losses of ``batch`` = (input ids, mask, labels), shape (batch,).

    Labels of shape (batch,) are class indices (cross-entropy per example); labels of shape
    (batch, seq) are causal-LM targets (:func:`causal_example_losses`). With ``trim``, columns
    that are padding in every row are dropped first (:func:`trim_padding`): a step costs the
    batch's longest example, not ``model.max_length``. Under DP ``trim`` is off, because a
    step whose time depends on its longest record tells whoever sees the time which records
    it holds. A fourth element of ``batch`` (row weights) is ignored here.
    """
    ids, mask, labels = batch[0], batch[1], batch[2]
    if trim:
        ids, mask, labels = trim_padding(ids, mask, labels)
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    logits = model(input_ids=ids, attention_mask=mask).logits
    if labels.dim() == 1:
        return torch.nn.functional.cross_entropy(logits.float(), labels, reduction="none")
    return causal_example_losses(logits, labels)


def forward_loss(model: torch.nn.Module, batch: Any, device: torch.device) -> torch.Tensor:
    """Return the training loss of ``batch``: the mean over examples of each example's own loss."""
    return example_losses(model, batch, device).mean()


def _micro_batches(batch: Any, parts: int) -> list[Any]:
    """Split a collated batch (a tuple of tensors) into up to ``parts`` non-empty row chunks."""
    if parts == 1:
        return [batch]
    chunks = list(zip(*(torch.tensor_split(t, parts) for t in batch), strict=True))
    return [c for c in chunks if len(c[0]) > 0]


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool) -> Iterator[None]:
    """Recompute activations in the backward pass while training ``model`` (if ``enabled``).

    Reentrant checkpointing: the first forward runs without autograd and the backward pass
    re-runs each layer with it, so Opacus' hooks see exactly one forward and one backward per
    layer and per-sample gradients stay exact under DP (non-reentrant checkpointing skips
    Opacus' backward hooks). The embedding output is made to require grad so the
    recomputed layers get gradients with a frozen base. Switched off again on exit: the
    base is shared.
    """
    if not enabled:
        yield
        return
    target = getattr(model, "get_base_model", lambda: model)()
    if not getattr(target, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient_checkpointing = true, but {type(target).__name__} does not support it; "
            "set it to false"
        )
    target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    target.enable_input_require_grads()
    try:
        yield
    finally:
        target.disable_input_require_grads()
        target.activation_checkpointing_disable()


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
    and loader and returns the versions to train with. Each optimiser step takes one batch,
    processed in ``cfg.grad_accum_steps`` micro-batches: the update is the same as in one
    pass (the mean of the examples' losses), only peak memory drops. Under DP the per-sample
    gradients of every micro-batch are clipped and summed and noise is added once per batch
    (Opacus' skipped steps), so sampling rate, noise and accounting do not change.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; check the LoRA target modules")
    n_steps = steps if steps is not None else planned_steps(len(dataset), cfg)  # type: ignore[arg-type]
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=generator)
    amp = autocast_dtype(device, cfg.precision)
    if wrap is not None and amp == torch.float16:
        if cfg.precision == "fp16":
            raise ValueError(
                "train.precision = 'fp16' cannot be used with DP (loss scaling would scale the "
                "per-sample gradients before clipping); use 'bf16' or 'fp32'"
            )
        amp = None  # 'auto' on a GPU without bf16: fp32 under DP
    # Dropout draws from torch's global generator: seed it for this round so runs with DP off
    # are reproducible; fork_rng restores the caller's state afterwards. DP noise and Poisson
    # sampling never use it (they draw from OS entropy, fedlora.privacy.randomness).
    rng_devices = [device] if device.type == "cuda" else []
    with gradient_checkpointing(model, cfg.gradient_checkpointing), torch.random.fork_rng(rng_devices):
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        train_model: torch.nn.Module = model
        if wrap is not None:
            train_model, optimizer, loader = wrap(model, optimizer, loader)
        return _loop(train_model, optimizer, loader, params, cfg, device, amp, n_steps, wrap is not None)


def _loop(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader,
    params: list[torch.nn.Parameter],
    cfg: TrainConfig,
    device: torch.device,
    amp: torch.dtype | None,
    n_steps: int,
    private: bool,
) -> TrainResult:
    warmup = cfg.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0
    )
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    model.train()
    total, seen, t0 = 0.0, 0, time.perf_counter()
    batches = _batches(loader)
    for _ in range(n_steps):
        batch = next(batches)
        # Under DP the loader pads each Poisson batch to a fixed row count and adds a weight
        # column (1 real record, 0 filler; fedlora.privacy.dpsgd.FixedRows).
        size = int(batch[3].sum()) if len(batch) > 3 else len(batch[0])
        micro = _micro_batches(batch, cfg.grad_accum_steps)
        optimizer.zero_grad(set_to_none=True)
        step_loss = 0.0
        for i, chunk in enumerate(micro):
            ctx = torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext()
            with ctx:
                losses = example_losses(model, chunk, device, trim=not private)
            if len(chunk) > 3:
                losses = losses * chunk[3].to(losses.device)  # filler rows: weight 0, gradient exactly 0
            if not torch.isfinite(losses).all():
                raise FloatingPointError(
                    f"training loss became {losses.mean().item()}; lower train.lr or check the data"
                )
            step_loss += float(losses.detach().sum())
            # Opacus rescales a mean loss by the micro-batch's row count itself, so each row's
            # gradient is its own (weighted) loss's; without DP, weight each micro-batch by its
            # share of the batch so the summed gradient is the batch mean.
            loss = losses.mean() if private else losses.sum() / size
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if private and i < len(micro) - 1:
                optimizer.signal_skip_step(do_skip=True)  # type: ignore[attr-defined]
                optimizer.step()  # clips and accumulates this micro-batch's per-sample gradients
                optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if not private and cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        scheduler.step()
        total += step_loss / max(1, size)
        seen += size
    return TrainResult(
        loss=total / max(1, n_steps), steps=n_steps, examples_seen=seen, seconds=time.perf_counter() - t0
    )


def trim_padding(
    ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop the trailing columns that are padding in every row of a batch.

    ``ids`` and ``mask`` are (batch, seq); ``labels`` is (batch,) or (batch, seq). Encoded
    examples are right-padded to ``model.max_length``, and a masked position changes no other
    position's output, so the cut columns change no logit, loss or gradient of a kept one (up to
    float rounding) and training and evaluation do less work. Left-padded batches end in real
    tokens and are returned whole.
    """
    used = torch.nonzero(mask.any(dim=0))
    end = int(used.max()) + 1 if len(used) else mask.shape[1]
    if end == mask.shape[1]:
        return ids, mask, labels
    return ids[:, :end], mask[:, :end], labels[:, :end] if labels.dim() == 2 else labels


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    dataset: Dataset,
    task: str,
    device: torch.device,
    batch_size: int = 64,
    trim: bool = True,
) -> EvalResult:
    """Return loss and accuracy of ``model`` on ``dataset``.

    Classification: mean cross-entropy and accuracy over examples. Causal LM: the mean
    next-token loss over all response tokens of the data set (its exponential is the
    held-out response perplexity, in ``extras["perplexity"]``) and token accuracy.
    ``trim=False`` keeps every batch at the encoded length, so the time taken depends only on
    the number of examples (a client's local validation under DP).
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        return EvalResult(loss=float("nan"), accuracy=float("nan"), examples=0)
    was_training = model.training
    model.eval()
    loss_sum, correct, count, n = 0.0, 0, 0, 0
    for batch in DataLoader(dataset, batch_size=batch_size):
        ids, mask, labels = (t.to(device) for t in (trim_padding(*batch) if trim else batch))
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        n += len(ids)
        if task == "classification":
            loss_sum += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(-1) == labels).sum())
            count += len(labels)
        else:
            # Position t predicts token t+1; score only response tokens.
            pred, target = logits[:, :-1], labels[:, 1:]
            keep = target != IGNORE_INDEX
            loss_sum += float(torch.nn.functional.cross_entropy(pred[keep], target[keep], reduction="sum"))
            correct += int((pred[keep].argmax(-1) == target[keep]).sum())
            count += int(keep.sum())
    model.train(was_training)
    if task == "classification":
        return EvalResult(loss=loss_sum / n, accuracy=correct / max(1, count), examples=n)
    if count == 0:  # a perplexity of 1.00 over no tokens would look like a result
        raise ValueError(f"evaluation over zero response tokens ({n} examples): raise model.max_length")
    loss = loss_sum / max(1, count)
    return EvalResult(
        loss=loss,
        accuracy=correct / max(1, count),
        examples=n,
        extras={"perplexity": math.exp(min(loss, 50.0)), "response_tokens": count},
    )
