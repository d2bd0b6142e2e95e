"""Greedy answers of a causal LM to held-out instructions: exact-match and before/after samples.

Perplexity says how likely the reference answers are; exact-match says whether the model
actually *produces* them, which is what a user sees. Prompts are built exactly as in
training (:func:`fedlora.data.encode.prompt_ids`), left-padded into batches so every row's
answer starts at the same position, and decoded greedily until EOS or a token budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedlora.data.encode import prompt_ids
from fedlora.data.instruct import exact_match
from fedlora.data.sources import Record


@dataclass(frozen=True)
class GenerationResult:
    """Greedy answers to ``records`` and the share that matches the reference exactly."""

    answers: list[str]
    exact_match: float

    def samples(self, records: Sequence[Record], n: int) -> list[dict[str, Any]]:
        """Return the first ``n`` (instruction, reference, answer, exact) rows, for the run directory."""
        return [
            {
                "instruction": r["instruction"],
                "reference": r["response"],
                "answer": a,
                "exact": exact_match(a, str(r["response"])),
            }
            for r, a in zip(records[:n], self.answers[:n], strict=False)
        ]


def answer_budget(tokenizer: Any, records: Sequence[Record], cap: int = 64) -> int:
    """Return a new-token budget: the longest reference answer plus EOS and one spare, at most ``cap``."""
    longest = max(len(tokenizer(str(r["response"]), add_special_tokens=False)["input_ids"]) for r in records)
    return min(cap, longest + 2)


@torch.no_grad()
def generate_answers(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    device: torch.device,
    max_new_tokens: int,
    batch_size: int = 16,
) -> list[str]:
    """Return the greedy answer (special tokens removed, stripped) to every instruction."""
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers: list[str] = []
    for start in range(0, len(instructions), batch_size):
        rows = [prompt_ids(tokenizer, text) for text in instructions[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        for row in out[:, width:]:
            answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return answers


def evaluate_generation(
    model: Any, tokenizer: Any, records: Sequence[Record], device: torch.device, batch_size: int = 16
) -> GenerationResult:
    """Answer ``records`` greedily and score exact-match against their responses."""
    if not records:
        return GenerationResult([], float("nan"))
    budget = answer_budget(tokenizer, records)
    answers = generate_answers(
        model, tokenizer, [str(r["instruction"]) for r in records], device, budget, batch_size
    )
    hits = sum(exact_match(a, str(r["response"])) for a, r in zip(answers, records, strict=True))
    return GenerationResult(answers, hits / len(records))
