"""The server's own copy of the model: initial adapter template, held-out evaluation, export."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from fedlora.adapters import AdapterState, is_lora, split_state
from fedlora.atomic import append_line
from fedlora.config import RunConfig
from fedlora.data.encode import encode
from fedlora.data.sources import Record
from fedlora.export import save_peft_adapter
from fedlora.generate import evaluate_generation
from fedlora.models import (
    adapter_state,
    get_lora_model,
    init_adapter_state,
    load_adapter_state,
    merged_into_base,
)
from fedlora.train import EvalResult, evaluate, resolve_device
from server.outputs import SAMPLES_FILE

#: Held-out causal-LM examples answered by greedy generation at every evaluation (exact-match).
GENERATE_LIMIT = 64
#: Of those, how many (instruction, reference, answer) rows go to ``samples.jsonl`` per round.
SAMPLES_PER_ROUND = 8


class ServerModel:
    """Base model + adapters on the server, used for evaluation and export (never trained here).

    For causal LMs every evaluation also answers up to :data:`GENERATE_LIMIT` held-out
    instructions greedily: ``extras`` then carry ``test_exact_match`` and
    ``test_perplexity``, and the first answers of each round are appended to
    ``samples.jsonl`` in the run directory (round 0 is the base model: before/after).
    """

    def __init__(self, cfg: RunConfig, labels: tuple[str, ...], test: list[Record]) -> None:
        self.cfg = cfg
        self.labels = labels
        self.num_labels = max(2, len(labels))
        self.device = resolve_device(cfg.train.device)
        first = self._loaded(cfg.lora.rank)  # for its tokenizer: any rank would do
        self.test_records = list(test)
        self.test = encode(test, first.tokenizer, cfg.model.max_length, cfg.model.task)

    def _loaded(self, rank: int, alpha: float | None = None):  # noqa: ANN202 - LoadedModel
        alpha = self.cfg.lora.alpha_for(rank) if alpha is None else alpha
        return get_lora_model(
            self.cfg.model.name,
            self.cfg.model.task,
            self.num_labels,
            rank,
            alpha,
            0.0,
            self.cfg.lora.target_modules,
            quantization=self.cfg.model.quantization,
            device=self.cfg.train.device,
        )

    def template(self, rank: int, seed: int) -> AdapterState:
        """Return the seeded initial adapter at ``rank`` (what every client derives too)."""
        return init_adapter_state(adapter_state(self._loaded(rank), rank), seed)

    def evaluate(
        self,
        adapter: Mapping[str, torch.Tensor],
        merge: Mapping[str, torch.Tensor] | None = None,
        rnd: int | None = None,
    ) -> EvalResult:
        """Score ``adapter`` (and an optional base merge) on the held-out test split.

        ``rnd`` labels the generation samples written for round ``rnd`` (causal LM only).
        """
        pairs, _ = split_state(adapter)
        rank = next(iter(pairs.values())).rank
        alpha = self.cfg.lora.alpha_for(rank)
        loaded = self._loaded(rank, alpha)
        load_adapter_state(loaded, rank, adapter)
        model = loaded.peft.to(self.device)
        with merged_into_base(loaded, merge):
            ev = evaluate(model, self.test, self.cfg.model.task, self.device, self.cfg.train.eval_batch_size)
            if self.cfg.model.task != "causal-lm" or not self.test_records:
                return ev
            records = self.test_records[:GENERATE_LIMIT]
            gen = evaluate_generation(
                model, loaded.tokenizer, records, self.device, self.cfg.train.eval_batch_size
            )
        self._write_samples(rnd, gen.samples(records, SAMPLES_PER_ROUND))
        extras = {"test_perplexity": ev.extras["perplexity"], "test_exact_match": gen.exact_match}
        return EvalResult(ev.loss, ev.accuracy, ev.examples, extras)

    def _write_samples(self, rnd: int | None, rows: list[dict[str, object]]) -> None:
        if rnd is None or not self.cfg.output.out_dir:
            return
        path = Path(self.cfg.output.out_dir) / SAMPLES_FILE
        text = "".join(json.dumps({"round": rnd, **row}, sort_keys=True) + "\n" for row in rows)
        path.parent.mkdir(parents=True, exist_ok=True)  # an evaluator used before the run dir exists
        append_line(path, text)  # 0600, never through a link planted at the path

    def export(
        self, out_dir: Path, adapter: Mapping[str, torch.Tensor], merge: Mapping[str, torch.Tensor] | None
    ) -> Path:
        """Write the final global adapter in PEFT format.

        With a base merge (FLoRA) the merge itself is the exported LoRA (scale folded in, so
        ``alpha = rank``) and the adapter contributes only its head tensors.
        """
        # Module names only; the exported rank is the adapter's own (the clients' global rank).
        loaded = self._loaded(next(iter(split_state(merge or adapter)[0].values())).rank)
        if merge:
            state = {**dict(merge), **{k: v for k, v in adapter.items() if not is_lora(k)}}
            alpha = float(next(iter(split_state(merge)[0].values())).rank)
        else:
            state = dict(adapter)
            alpha = self.cfg.lora.alpha_for(next(iter(split_state(adapter)[0].values())).rank)
        meta = {
            "labels": list(self.labels),
            "model": self.cfg.model.name,
            "task": self.cfg.model.task,
            "max_length": self.cfg.model.max_length,
            "strategy": self.cfg.federation.strategy,
            # Generated data (embedded, instruct) is rebuilt from these by `fedlora evaluate`.
            "data": {k: getattr(self.cfg.data, k) for k in ("source", "num_train", "num_test", "seed")},
        }
        return save_peft_adapter(
            out_dir,
            state,
            meta=meta,
            base_model=self.cfg.model.name,
            task=self.cfg.model.task,
            alpha=alpha,
            target_modules=loaded.target_modules,
            head_modules=loaded.head_modules,
        )
