"""LoRA target-module detection on tiny, randomly initialised model directories of five families.

Each model is built in-process from its config (2 layers, hidden 32), saved with a tokenizer
as a Hugging Face model directory, and loaded through ``get_lora_model`` as a user's path would.
"""

import pytest
import torch
from peft.tuners.lora import LoraLayer
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    RobertaConfig,
)

from fedlora.models import detect_target_modules, get_lora_model, resolve_model_path

LAYERS = 2


def _decoder(cls, tok):
    return cls(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )


CASES = {
    # family: (config builder, task, the projections LoRA must adapt)
    "gpt2": (
        lambda tok: GPT2Config(
            vocab_size=tok.vocab_size, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
        ),
        "causal-lm",
        ("c_attn",),
    ),
    "roberta": (
        lambda tok: RobertaConfig(
            vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
            num_attention_heads=4, max_position_embeddings=72, pad_token_id=tok.pad_token_id,
        ),
        "classification",
        ("query", "value"),
    ),
    "qwen2": (lambda tok: _decoder(Qwen2Config, tok), "causal-lm", ("q_proj", "v_proj")),
    "mistral": (lambda tok: _decoder(MistralConfig, tok), "causal-lm", ("q_proj", "v_proj")),
    "llama": (lambda tok: _decoder(LlamaConfig, tok), "classification", ("q_proj", "v_proj")),
}  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.eos_token = "[SEP]"
    return tok


def _model_dir(tmp_path, family, tokenizer):
    build, task, _ = CASES[family]
    torch.manual_seed(0)
    config = build(tokenizer)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_config(config)
    else:
        config.num_labels = 2
        model = AutoModelForSequenceClassification.from_config(config)
    path = tmp_path / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("family", list(CASES))
def test_detected_targets_get_lora_layers_in_every_block(tmp_path, tokenizer, family):
    _, task, expected = CASES[family]
    path = _model_dir(tmp_path, family, tokenizer)
    loaded = get_lora_model(str(path), task, 2, rank=2, alpha=4.0)
    assert loaded.target_modules == expected
    heads = {"roberta": ("classifier",), "llama": ("score",)}.get(family, ())
    assert loaded.head_modules == heads  # the classification head trains (and travels) with the adapter
    adapted = [n for n, m in loaded.peft.named_modules() if isinstance(m, LoraLayer)]
    assert sorted({n.rsplit(".", 1)[-1] for n in adapted}) == sorted(expected)
    assert len(adapted) == LAYERS * len(expected)  # every block, nothing else
    ids = torch.tensor([[101, 2023, 2003, 102]])
    with torch.no_grad():
        out = loaded.peft(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert torch.isfinite(out.logits).all()


def test_unknown_model_type_falls_back_to_projection_names(tmp_path, tokenizer):
    model = AutoModelForCausalLM.from_config(_decoder(LlamaConfig, tokenizer))
    model.config.model_type = "in-house-decoder"
    assert detect_target_modules(model) == ("q_proj", "v_proj")
