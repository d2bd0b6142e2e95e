"""Settings that follow from the model and the data: the task and the token length of examples.

A scenario file describes a scenario (data, clients, strategy, budget), not a model. What
depends on the model is derived here, once, before any client starts, unless the user set it:

* ``model.task = "auto"``: the data's columns decide (:func:`infer_task`): ``instruction`` /
  ``response`` mean causal LM, ``text`` / ``label`` mean classification (the column names are
  the ``data.*_column`` settings); data that has both or neither is refused, naming the flags.
* ``model.max_length = 0``: the length that keeps nearly every example whole
  (:func:`choose_max_length`: the 99th percentile of the tokenised lengths, or the longest
  when that is at most 1.5 times as long, rounded up to a multiple of 8), capped by the model's
  context.

Whatever the length, :func:`cut_counts` checks the encoded examples: a causal-LM example whose
response is cut away entirely would train on zero target tokens, so the run is refused with the
count and the fix; examples cut only partly are counted in a warning. LoRA target modules and
classification heads follow the architecture in :mod:`fedlora.models` (empty
``lora.target_modules``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedlora.config import DataConfig, RunConfig
from fedlora.data.sources import DataError, Record

log = logging.getLogger(__name__)

# Share of examples the derived max_length keeps whole.
KEEP_WHOLE = 0.99
# Lengths are rounded up to a multiple of this (friendlier to kernels, stable across similar data).
LENGTH_STEP = 8


@dataclass(frozen=True)
class Cuts:
    """How many examples a ``max_length`` cuts: target gone entirely, or only partly."""

    total: int
    emptied: int
    partly: int


def infer_task(data: DataConfig) -> str:
    """Return the task the data describes: ``"classification"`` or ``"causal-lm"``.

    Raises
    ------
    DataError
        If the columns fit both tasks or neither (the message names the flags that decide).
    """
    if data.source == "embedded":
        return "classification"
    if data.source == "instruct":
        return "causal-lm"
    from fedlora.data.sources import WHERE, read_rows

    columns = {k for k in read_rows(data.source, data.format)[0] if k != WHERE}
    return task_from_columns(columns, data, data.source)


def task_from_columns(columns: set[str], data: DataConfig, source: str) -> str:
    """Return the task that ``columns`` fit (pure; see :func:`infer_task`)."""
    causal = {data.instruction_column, data.response_column} <= columns
    classify = {data.text_column, data.label_column} <= columns
    if causal and not classify:
        return "causal-lm"
    if classify and not causal:
        return "classification"
    found = sorted(columns)
    what = "both" if causal else "neither"
    raise DataError(
        f"cannot tell the task of {source!r} from its columns {found}: it has {what} "
        f"{data.instruction_column!r}/{data.response_column!r} (causal LM) and "
        f"{data.text_column!r}/{data.label_column!r} (classification); pass --task causal-lm or "
        "--task classification, and name the columns with --text-column / --label-column or "
        "--set data.instruction_column=... --set data.response_column=..."
    )


def choose_max_length(lengths: Sequence[int], context: int | None) -> int:
    """Return a length keeping :data:`KEEP_WHOLE` of ``lengths`` whole, capped by ``context``."""
    if not lengths:
        raise DataError("no examples to choose model.max_length from")
    ordered = sorted(lengths)

    def rounded(n: int) -> int:
        return max(LENGTH_STEP, math.ceil(n / LENGTH_STEP) * LENGTH_STEP)

    length = rounded(ordered[max(0, math.ceil(KEEP_WHOLE * len(ordered)) - 1)])
    if rounded(ordered[-1]) <= 1.5 * length:  # a few outliers not far out: keep them whole too
        length = rounded(ordered[-1])
    return min(length, context) if context else length


def cut_counts(prompt_lengths: Sequence[int], total_lengths: Sequence[int], max_length: int) -> Cuts:
    """Count examples whose target (the tokens after the prompt) ``max_length`` empties or cuts.

    For classification pass prompt lengths of 0: the label is not in the text, so only partial
    cuts of the text are possible.
    """
    emptied = partly = 0
    for prompt, total in zip(prompt_lengths, total_lengths, strict=True):
        if total <= max_length:
            continue
        if prompt > 0 and prompt >= max_length:
            emptied += 1
        else:
            partly += 1
    return Cuts(len(total_lengths), emptied, partly)


def token_lengths(records: Sequence[Record], tokenizer: Any, task: str) -> tuple[list[int], list[int]]:
    """Return (prompt lengths, whole lengths) of ``records`` as :mod:`fedlora.data.encode` builds them."""
    if task == "classification":
        totals = [len(ids) for ids in tokenizer([r["text"] for r in records])["input_ids"]]
        return [0] * len(totals), totals
    from fedlora.data.encode import prompt_ids

    eos = 1 if tokenizer.eos_token_id is not None else 0
    prompts = [len(prompt_ids(tokenizer, str(r["instruction"]))) for r in records]
    answers = tokenizer([str(r["response"]) for r in records], add_special_tokens=False)["input_ids"]
    return prompts, [p + len(a) + eos for p, a in zip(prompts, answers, strict=True)]


def check_cuts(cuts: Cuts, max_length: int, longest: int, where: str) -> None:
    """Refuse examples left without target tokens; warn about partly cut ones (with the counts)."""
    fix = f"raise model.max_length (e.g. --set model.max_length={longest}) or leave it unset (0) to derive it"
    if cuts.emptied:
        raise DataError(
            f"{cuts.emptied} of {cuts.total} {where} examples lose their whole response at "
            f"model.max_length = {max_length}: they would train on zero target tokens; {fix}, "
            "or shorten the prompts"
        )
    if cuts.partly:
        log.warning(
            "%d of %d %s examples are cut at model.max_length = %d (their ends are not trained); %s",
            cuts.partly,
            cuts.total,
            where,
            max_length,
            fix,
        )


# Encoder-only architectures (bidirectional attention): they cannot be trained as causal LMs.
ENCODERS = frozenset(
    {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "albert", "deberta", "deberta-v2", "mpnet"}
)


def check_task_fits(task: str, model_type: str, name: str) -> None:
    """Refuse causal-LM fine-tuning of an encoder-only model (it would see the tokens it predicts).

    Raises
    ------
    DataError
        Naming the model, why, and the two ways out.
    """
    if task == "causal-lm" and model_type in ENCODERS:
        raise DataError(
            f"model {name!r} ({model_type}) is an encoder: it cannot generate text, so it cannot be "
            "fine-tuned on instruction/response data (causal LM); pick a decoder model (e.g. --model "
            "smollm2, or a local Llama/GPT-2/Qwen directory) or give classification data (text and "
            "label columns, --task classification)"
        )


def model_context(path: str) -> int | None:
    """Return the model's context length in tokens (``None`` when its config does not say)."""
    config = _model_config(path)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@functools.lru_cache(maxsize=4)
def _model_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


@functools.lru_cache(maxsize=4)
def _tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return AutoTokenizer.from_pretrained(path)


def derive_config(cfg: RunConfig, *, check: bool = False) -> tuple[RunConfig, list[str]]:
    """Return ``cfg`` with ``model.task`` and ``model.max_length`` derived, and one note per derived value.

    A config with both set is returned unchanged without loading anything unless ``check``, so
    every party can call this (the server sends the derived config to the clients). Whenever the
    data is loaded here (``check``, or something to derive) the encoded lengths are checked
    (:func:`check_cuts`).

    Raises
    ------
    DataError
        If the task cannot be told from the data, or examples would keep no target token.
    """
    if cfg.model.task != "auto" and cfg.model.max_length > 0 and not check:
        return cfg, []
    task, length, notes = _derive(cfg.model.name, cfg.model.task, cfg.model.max_length, cfg.data)
    return replace(cfg, model=replace(cfg.model, task=task, max_length=length)), list(notes)


@functools.lru_cache(maxsize=8)
def _derive(name: str, task: str, length: int, data_cfg: DataConfig) -> tuple[str, int, tuple[str, ...]]:
    """Return (task, max_length, notes) for the model ``name`` on ``data_cfg`` (cached per process)."""
    from fedlora.data.cached import task_data
    from fedlora.modelstore import resolve_model_path

    notes: list[str] = []
    if task == "auto":
        task = infer_task(data_cfg)
        notes.append(f"task {task} (from the data)")
    path = resolve_model_path(name)
    check_task_fits(task, getattr(_model_config(path), "model_type", ""), name)
    tokenizer = _tokenizer(path)
    data = task_data(data_cfg, task)
    prompts, totals = token_lengths([*data.train, *data.test], tokenizer, task)
    context = model_context(path)
    if length == 0:
        length = choose_max_length(totals, context)
        whole = sum(t <= length for t in totals)
        notes.append(
            f"max_length {length} (from the data: keeps {whole} of {len(totals)} examples whole, "
            f"longest {max(totals)} tokens" + (f", model context {context})" if context else ")")
        )
    check_cuts(cut_counts(prompts, totals, length), length, max(totals), "train/test")
    return task, length, tuple(notes)
