"""Models for the LLM tests: the real SmolLM2-135M-Instruct when installed, a tiny random Llama (helpers)."""

import pytest
import torch

from fedlora.modelstore import SMOLLM2_INSTALL, ModelError, smollm2_gguf


def smollm2_installed() -> bool:
    try:
        smollm2_gguf()
    except ModelError:
        return False
    return True


requires_smollm2 = pytest.mark.skipif(
    not smollm2_installed(), reason=f"optional SmolLM2 package not installed ({SMOLLM2_INSTALL})"
)


def tiny_llama_dir(path):
    """Save a 2-layer random Llama with the MiniLM word-piece tokenizer (no chat template) to ``path``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fedlora.models import resolve_model_path

    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.eos_token = "[SEP]"
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.sep_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path
