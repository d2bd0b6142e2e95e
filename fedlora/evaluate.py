"""``fedlora evaluate``: score a saved PEFT adapter with plain transformers + PEFT loading."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedlora.config import DataConfig
from fedlora.data.encode import encode
from fedlora.data.sources import (
    DataError,
    classification_records,
    instruction_records,
    load_task_data,
    read_rows,
)
from fedlora.export import META_FILE
from fedlora.models import resolve_model_path
from fedlora.train import evaluate, resolve_device


def evaluate_adapter(
    adapter_dir: Path,
    *,
    data: str = "embedded",
    data_format: str = "auto",
    text_column: str = "text",
    label_column: str = "label",
    model: str | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Load base + adapter with ``PeftModel.from_pretrained`` and return loss/accuracy on ``data``.

    Raises
    ------
    FileNotFoundError
        If ``adapter_dir`` is not an adapter directory written by fedlora.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    meta_path = adapter_dir / META_FILE
    if not (adapter_dir / "adapter_config.json").is_file() or not meta_path.is_file():
        raise FileNotFoundError(
            f"{str(adapter_dir)!r} is not a fedlora adapter directory "
            f"(needs adapter_config.json and {META_FILE})"
        )
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    labels, task, max_length = tuple(meta["labels"]), meta["task"], int(meta["max_length"])
    path = resolve_model_path(model or meta["model"])
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if task == "classification":
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=max(2, len(labels)))
    else:
        base = AutoModelForCausalLM.from_pretrained(path)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    if data == "embedded":
        records = load_task_data(DataConfig(), task).test
    else:
        dcfg = DataConfig(source=data, format=data_format, text_column=text_column, label_column=label_column)
        rows = read_rows(data, data_format)
        if task == "classification":
            records, _ = classification_records(rows, dcfg, data, labels)
        else:
            records = instruction_records(rows, dcfg, data)
    if not records:
        raise DataError(f"no records to evaluate in {data!r}")
    dev = resolve_device(device)
    res = evaluate(peft_model.to(dev), encode(records, tokenizer, max_length, task), task, dev)
    return {"examples": res.examples, "accuracy": res.accuracy, "loss": res.loss}
