"""Turn records into padded token tensors for the two supported tasks.

Classification: ``input_ids``, ``attention_mask``, ``labels`` (one int per example).
Causal LM: the prompt followed by the response and EOS; ``labels`` copy the input ids with
prompt and padding positions set to -100, so the loss covers only the response tokens. The
prompt is the model's own chat template (one user turn, then the assistant header) when
the tokenizer has one, else ``PROMPT.format(instruction=...)``. Padding is on the right;
a response cut by ``max_length`` keeps its first tokens; an example whose response is cut away
entirely is refused and partly cut ones are counted in a warning (:func:`fedlora.derive.check_cuts`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import TensorDataset

from fedlora.data.sources import Record

log = logging.getLogger(__name__)

PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
IGNORE_INDEX = -100


def encode_classification(records: Sequence[Record], tokenizer: Any, max_length: int) -> TensorDataset:
    """Tokenise ``{"text", "label"}`` records into a TensorDataset (ids, mask, labels)."""
    enc = tokenizer(
        [r["text"] for r in records],
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    labels = torch.tensor([int(r["label"]) for r in records], dtype=torch.long)
    return TensorDataset(enc["input_ids"], enc["attention_mask"], labels)


def prompt_text(tokenizer: Any, instruction: str) -> str:
    """Return the text the model sees before its answer (chat template, or :data:`PROMPT`)."""
    if getattr(tokenizer, "chat_template", None):
        return str(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": instruction}], add_generation_prompt=True, tokenize=False
            )
        )
    return PROMPT.format(instruction=instruction)


def prompt_ids(tokenizer: Any, instruction: str) -> list[int]:
    """Return the token ids of :func:`prompt_text` (the template carries its own special tokens)."""
    text = prompt_text(tokenizer, instruction)
    templated = bool(getattr(tokenizer, "chat_template", None))
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def encode_causal(
    records: Sequence[Record], tokenizer: Any, max_length: int, *, refuse_cuts: bool = True
) -> TensorDataset:
    """Tokenise ``{"instruction", "response"}`` records, masking the prompt out of the loss.

    ``refuse_cuts=False`` (a node under record-level DP, whose server picks ``max_length``): an
    example cut before its response trains on zero target tokens (no gradient) instead of
    refusing the round, since a refusal would tell the server that one record is that long; the
    counts go to the node's own log only.
    """
    pad = tokenizer.pad_token_id
    eos = tokenizer.eos_token_id
    ids_rows, mask_rows, label_rows = [], [], []
    prompt_lengths, total_lengths = [], []
    for r in records:
        prompt = prompt_ids(tokenizer, str(r["instruction"]))
        answer = tokenizer(r["response"], add_special_tokens=False)["input_ids"]
        if eos is not None:
            answer = [*answer, eos]
        prompt_lengths.append(len(prompt))
        total_lengths.append(len(prompt) + len(answer))
        ids = (prompt + answer)[:max_length]
        labels = ([IGNORE_INDEX] * len(prompt) + answer)[:max_length]
        n_pad = max_length - len(ids)
        ids_rows.append(ids + [pad] * n_pad)
        mask_rows.append([1] * len(ids) + [0] * n_pad)
        label_rows.append(labels + [IGNORE_INDEX] * n_pad)
    from fedlora.derive import check_cuts, cut_counts

    longest = max(total_lengths, default=0)
    cuts = cut_counts(prompt_lengths, total_lengths, max_length)
    if refuse_cuts:
        check_cuts(cuts, max_length, longest, "encoded")
    elif cuts.emptied or cuts.partly:
        log.warning(
            "%d encoded examples lose their whole response, %d are partly cut", cuts.emptied, cuts.partly
        )
    return TensorDataset(
        torch.tensor(ids_rows, dtype=torch.long),
        torch.tensor(mask_rows, dtype=torch.long),
        torch.tensor(label_rows, dtype=torch.long),
    )


def encode(
    records: Sequence[Record], tokenizer: Any, max_length: int, task: str, *, refuse_cuts: bool = True
) -> TensorDataset:
    """Dispatch to :func:`encode_classification` or :func:`encode_causal` (``refuse_cuts``: see there)."""
    if task == "classification":
        return encode_classification(records, tokenizer, max_length)
    return encode_causal(records, tokenizer, max_length, refuse_cuts=refuse_cuts)
