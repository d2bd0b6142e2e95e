"""``fedlora evaluate``: score a saved PEFT adapter with plain transformers + PEFT loading.

Classification: loss and accuracy. Causal LM: held-out response loss and perplexity, token
accuracy, exact-match of greedy answers (on up to :data:`GENERATE_LIMIT` records) and a few
answer samples. ``data`` is a file, or ``"embedded"``/``"instruct"`` for the generated data
sets, rebuilt with the run's settings recorded in the adapter's metadata.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig
from fedlora.data.encode import encode
from fedlora.data.sources import (
    DataError,
    Record,
    classification_records,
    instruction_records,
    load_task_data,
    read_rows,
)
from fedlora.export import META_FILE
from fedlora.models import resolve_model_path
from fedlora.train import evaluate, resolve_device

GENERATED = ("embedded", "instruct")
GENERATE_LIMIT = 64


def _records(meta: dict[str, Any], data: str, dcfg: DataConfig, task: str) -> list[Record]:
    labels = tuple(meta["labels"])
    if data in GENERATED:
        if data == "embedded" and task != "classification":
            data = "instruct"  # the generated data set of causal-LM runs
        recorded = meta.get("data") or {}
        base = DataConfig(source=data)
        if recorded.get("source") == data:
            keep = {k: recorded[k] for k in ("num_train", "num_test", "seed") if k in recorded}
            base = replace(base, **keep)
        return load_task_data(base, task).test
    rows = read_rows(data, dcfg.format)
    if task == "classification":
        records, _ = classification_records(rows, dcfg, data, labels)
        return records
    return instruction_records(rows, dcfg, data)


def evaluate_adapter(
    adapter_dir: Path,
    *,
    data: str = "embedded",
    data_format: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    instruction_column: str = "instruction",
    response_column: str = "response",
    model: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Load base + adapter with ``PeftModel.from_pretrained`` and score it on ``data``.

    Returns ``examples``, ``loss`` and ``accuracy``; for causal LMs also ``perplexity``,
    ``exact_match`` and ``samples`` (instruction, reference, answer).

    Raises
    ------
    FileNotFoundError
        If ``adapter_dir`` is not an adapter directory written by fedlora.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # transformers reports the base model's classification head as "MISSING ... newly initialized":
    # true of the bare base, but the adapter loaded next carries the trained head (modules_to_save).
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from fedlora.generate import evaluate_generation

    meta_path = adapter_dir / META_FILE
    if not (adapter_dir / "adapter_config.json").is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} is not a fedlora adapter directory "
            f"(needs adapter_config.json and {META_FILE})"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    labels, task, max_length = tuple(meta["labels"]), meta["task"], int(meta["max_length"])
    dcfg = DataConfig(
        source=data,
        format=data_format,
        text_column=text_column,
        label_column=label_column,
        instruction_column=instruction_column,
        response_column=response_column,
    )
    records = _records(meta, data, dcfg, task)
    if not records:
        raise DataError(f"no records to evaluate in {data!r}")
    path = resolve_model_path(model or meta["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if task == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=max(2, len(labels)))
    else:
        base = AutoModelForCausalLM.from_pretrained(path)
    dev = resolve_device(device)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir)).to(dev)
    res = evaluate(peft_model, encode(records, tokenizer, max_length, task), task, dev)
    out: dict[str, Any] = {"examples": res.examples, "accuracy": res.accuracy, "loss": res.loss}
    if task != "classification":
        subset = records[:GENERATE_LIMIT]
        gen = evaluate_generation(peft_model, tokenizer, subset, dev)
        out.update(
            perplexity=res.extras["perplexity"],
            exact_match=gen.exact_match,
            generated=len(subset),
            samples=gen.samples(subset, 5),
        )
    return out
