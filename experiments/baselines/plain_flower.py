"""A plain Flower app for federated LoRA, in the pattern of Flower's own Opacus and PEFT examples.

What the pattern does (Flower's ``examples/opacus`` ClientApp and its FlowerTune/PEFT apps), and
what this app therefore does on purpose, to be measured against fedlora:

* every train message rebuilds the model: ``from_pretrained`` of the base, then
  ``get_peft_model``, then the received adapter state is loaded into it;
* under DP every round makes a **fresh** Opacus ``PrivacyEngine`` (``make_private`` with a fixed
  noise multiplier) and reports ``privacy_engine.get_epsilon(delta)`` -- the ε of this round
  alone, since the engine's accountant starts empty every round;
* the whole adapter state (``get_peft_model_state_dict``: LoRA A, B and the classification head)
  goes both ways, and the server averages it with Flower's ``FedAvg`` (message API,
  ``strategy.start`` with a central ``evaluate_fn`` that also rebuilds the model).

The task is the same as fedlora's: the run config (:class:`fedlora.config.RunConfig` as JSON, in
the file named by :data:`CONFIG_ENV`) gives model, LoRA shape, data, local steps, batch size,
learning rate and DP settings; the records, their partition, the local train split and the
tokenisation are fedlora's, so both systems train on identical examples. Like Flower's Hugging
Face quickstart (``DataCollatorWithPadding``), every batch runs at its longest example's length:
fedlora's encoding pads to ``model.max_length`` and :func:`fedlora.train.trim_padding` cuts the
columns that are padding in every row, as fedlora itself does, so the comparison measures the
systems and not padding.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from torch.utils.data import DataLoader

from fedlora.config import RunConfig, from_json
from fedlora.data.cached import partitions, task_data
from fedlora.data.encode import encode
from fedlora.data.partition import split_local
from fedlora.models import detect_target_modules
from fedlora.train import trim_padding

CONFIG_ENV = "FEDLORA_BASELINE_CONFIG"

#: Central evaluations of this process, ``(round, accuracy)``: read by the benchmark after the run.
EVALUATIONS: list[tuple[int, float]] = []


@cache
def run_config() -> RunConfig:
    """Return the run config named by :data:`CONFIG_ENV` (read once per process)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise RuntimeError(f"set {CONFIG_ENV} to a fedlora run config JSON file (RunConfig.to_json())")
    return from_json(Path(path).read_text(encoding="utf-8"))


def build_model(cfg: RunConfig) -> tuple[Any, Any]:
    """Return a fresh (PEFT model, tokenizer): the base loaded from disk, LoRA injected (every call)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fedlora.modelstore import resolve_model_path

    path = resolve_model_path(cfg.model.name)
    labels = task_data(cfg.data, cfg.model.task).labels
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(cfg.federation.seed)  # the server's initial head; clients overwrite it
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=max(2, len(labels)))
    lora = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha_for(cfg.lora.rank),
        lora_dropout=cfg.lora.dropout,
        # the scenario's targets, or the model's usual ones (what fedlora picks when none are set)
        target_modules=list(cfg.lora.target_modules or detect_target_modules(base)),
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(base, lora), tokenizer


def adapter_arrays(model: Any) -> ArrayRecord:
    """Return the whole adapter state (LoRA A, B and the head) as Flower arrays."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in state.items()})


def load_arrays(model: Any, arrays: ArrayRecord) -> None:
    """Load received adapter arrays into ``model``."""
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(model, arrays.to_torch_state_dict())


def _train_steps(model: Any, loader: DataLoader, optimizer: torch.optim.Optimizer, steps: int) -> float:
    """Run ``steps`` optimiser steps over ``loader`` (cycled); return the mean loss."""
    model.train()
    total, done = 0.0, 0
    while done < steps:
        for batch in loader:
            if done == steps:
                break
            input_ids, attention_mask, labels = trim_padding(*batch)  # dynamic padding
            optimizer.zero_grad()
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
            out.loss.backward()
            optimizer.step()
            total += float(out.loss.detach())
            done += 1
    return total / max(1, done)


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Rebuild the model, load the global adapter, train (with a fresh PrivacyEngine under DP)."""
    cfg = run_config()
    pid, n_parts = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    model, tokenizer = build_model(cfg)
    load_arrays(model, msg.content["arrays"])
    records = partitions(cfg.data, cfg.model.task, n_parts)[pid]
    train_records, _ = split_local(records, cfg.data.local_val_fraction, cfg.data.seed + pid)
    dataset = encode(train_records, tokenizer, cfg.model.max_length, cfg.model.task)
    loader = DataLoader(dataset, batch_size=cfg.train.batch_size, shuffle=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr)
    metrics: dict[str, float | int] = {"num-examples": len(dataset)}
    trained = model
    engine = None
    if cfg.privacy.mode == "record":
        from opacus import PrivacyEngine

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(secure_mode=False)  # fresh every round, as in Flower's example
            trained, optimizer, loader = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=cfg.privacy.noise_multiplier,
                max_grad_norm=cfg.privacy.max_grad_norm,
            )
        metrics["dp-sample-rate"] = 1.0 / len(loader)
    metrics["train-loss"] = _train_steps(trained, loader, optimizer, cfg.train.local_steps)
    metrics["steps"] = cfg.train.local_steps
    if engine is not None:
        metrics["epsilon"] = float(engine.get_epsilon(delta=cfg.privacy.delta))  # this round's only
    reply = RecordDict({"arrays": adapter_arrays(model), "metrics": MetricRecord(metrics)})
    return Message(reply, reply_to=msg)


def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Central evaluation on the held-out split (rebuilding the model, as the examples do)."""
    cfg = run_config()
    model, tokenizer = build_model(cfg)
    load_arrays(model, arrays)
    test = encode(task_data(cfg.data, cfg.model.task).test, tokenizer, cfg.model.max_length, cfg.model.task)
    model.eval()
    correct = 0
    with torch.no_grad():
        for batch in DataLoader(test, batch_size=cfg.train.eval_batch_size):
            input_ids, attention_mask, labels = trim_padding(*batch)
            logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
            correct += int((logits.argmax(-1) == labels).sum())
    accuracy = correct / len(test)
    EVALUATIONS.append((server_round, accuracy))
    return MetricRecord({"accuracy": accuracy})


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """FedAvg over the whole adapter state for ``federation.num_rounds`` rounds."""
    run_fedavg(grid, context)


def run_fedavg(
    grid: Grid,
    context: Context,
    evaluate_fn: Callable[[int, ArrayRecord], MetricRecord] = evaluate_global,
) -> None:
    """Run Flower's ``FedAvg.start`` (the ServerApp's body) with central evaluation by ``evaluate_fn``.

    The deployed baseline (:mod:`experiments.baselines.plain_deploy_app`) passes a timed
    ``evaluate_global`` here; otherwise this is :func:`main`.
    """
    cfg = run_config()
    n = cfg.federation.num_clients
    k = cfg.federation.clients_per_round or n
    model, _ = build_model(cfg)
    strategy = FedAvg(
        fraction_train=k / n,
        fraction_evaluate=0.0,
        min_train_nodes=k,
        min_available_nodes=n,
    )
    strategy.start(
        grid=grid,
        initial_arrays=adapter_arrays(model),
        num_rounds=cfg.federation.num_rounds,
        evaluate_fn=evaluate_fn,
    )
