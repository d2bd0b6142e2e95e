"""The generated instruction data, chat-template encoding, non-IID split and causal-LM evaluation."""

import json

import pytest
import torch
from llm_models import requires_smollm2, tiny_llama_dir

from fedlora.config import DataConfig
from fedlora.data.encode import IGNORE_INDEX, PROMPT, encode, prompt_ids
from fedlora.data.instruct import TASK_TYPES, exact_match, instruct_records, instruct_splits
from fedlora.data.partition import partition_records
from fedlora.data.sources import DataError, load_task_data
from fedlora.modelstore import resolve_model_path


def test_generator_is_deterministic_and_answers_are_right():
    recs = instruct_records(40, seed=3)
    assert recs == instruct_records(40, seed=3) and recs != instruct_records(40, seed=4)
    assert [r["label"] for r in recs[:8]] == [0, 1, 2, 3, 0, 1, 2, 3]
    for r in recs:
        kind, text, answer = TASK_TYPES[r["label"]], r["instruction"], r["response"]
        if kind == "add":
            a, b = (int(x) for x in text.split("is ")[1].split("?")[0].split(" + "))
            assert answer == str(a + b)
        elif kind == "upper":
            assert answer == text.split(": ")[1].upper()
        elif kind == "reverse":
            assert answer.split() == text.split(": ")[1].split()[::-1]
        else:
            assert answer.islower() and "land of" in text


def test_test_split_holds_new_items_except_facts():
    train, test = instruct_splits(200, 40, seed=0)
    seen = {r["instruction"] for r in train}
    assert all(r["instruction"] not in seen for r in test if TASK_TYPES[r["label"]] != "fact")
    assert all(r["instruction"] in seen for r in test if TASK_TYPES[r["label"]] == "fact")


def test_exact_match_ignores_only_spacing_and_a_final_stop():
    assert exact_match(" 82. ", "82") and exact_match("tree  cat sun", "tree cat sun")
    assert not exact_match("The answer is 82", "82") and not exact_match("Green", "GREEN")


def test_instruct_source_and_shard_split_give_each_client_one_task_type():
    cfg = DataConfig(source="instruct", num_train=64, num_test=8, partitioner="shards", shards_per_client=1)
    data = load_task_data(cfg, "causal-lm")
    assert data.labels == TASK_TYPES and len(data.train) == 64 and len(data.test) == 8
    parts = partition_records(data.train, 4, cfg)
    assert sorted({r["label"] for r in p}.pop() for p in parts) == [0, 1, 2, 3]
    assert all(len({r["label"] for r in p}) == 1 for p in parts)
    with pytest.raises(DataError, match="causal-lm"):
        load_task_data(cfg, "classification")


def test_without_chat_template_the_plain_prompt_is_used(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama_dir(tmp_path / "tiny"))
    assert prompt_ids(tok, "hi") == tok(PROMPT.format(instruction="hi"))["input_ids"]


@requires_smollm2
def test_chat_template_prompt_and_loss_on_response_tokens_only():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path("smollm2"))
    rec = {"instruction": "Write in capital letters: red fox", "response": "RED FOX"}
    ids, mask, labels = (t[0] for t in encode([rec], tok, 64, "causal-lm").tensors)
    text = tok.decode(ids[mask.bool()])
    assert text.startswith("<|im_start|>system\n") and "<|im_start|>user\nWrite in capital" in text
    assert text.endswith("<|im_start|>assistant\nRED FOX<|im_end|>")
    scored = labels[labels != IGNORE_INDEX]
    assert tok.decode(scored) == "RED FOX<|im_end|>"
    assert (labels[~mask.bool()] == IGNORE_INDEX).all()


def test_evaluate_cli_path_scores_a_causal_adapter(tmp_path):
    from fedlora.evaluate import evaluate_adapter
    from fedlora.export import save_peft_adapter
    from fedlora.models import adapter_state, get_lora_model

    model_dir = tiny_llama_dir(tmp_path / "tiny")
    loaded = get_lora_model(str(model_dir), "causal-lm", 4, rank=2, alpha=4.0)
    out = save_peft_adapter(
        tmp_path / "adapter",
        adapter_state(loaded, 2),
        meta={"labels": list(TASK_TYPES), "model": str(model_dir), "task": "causal-lm", "max_length": 48},
        base_model=str(model_dir),
        task="causal-lm",
        alpha=4.0,
        target_modules=loaded.target_modules,
        head_modules=(),
    )
    data = tmp_path / "held_out.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in instruct_records(6, seed=9)), encoding="utf-8")
    res = evaluate_adapter(out, data=str(data), device="cpu")
    assert res["examples"] == 6 and res["generated"] == 6
    assert res["perplexity"] == pytest.approx(torch.tensor(res["loss"]).exp().item(), rel=1e-6)
    assert res["perplexity"] > 100  # random weights: about the vocabulary size
    assert res["exact_match"] == 0.0 and len(res["samples"]) == 5
    assert {"instruction", "reference", "answer", "exact"} <= set(res["samples"][0])
