"""Gradient accumulation, gradient checkpointing and a quantised (QLoRA) base, with and without DP.

Each memory feature must leave the update unchanged (accumulation, checkpointing) or keep
DP sound (only LoRA tensors private, one accounted step per batch). Tiny random Llama on CPU.
"""

from dataclasses import replace

import pytest
import torch
from llm_models import tiny_llama_dir

from fedlora.config import TrainConfig
from fedlora.data.encode import encode
from fedlora.data.instruct import instruct_records
from fedlora.models import (
    ModelError,
    adapter_state,
    get_lora_model,
    init_adapter_state,
    load_adapter_state,
    set_trainable,
)
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.quantize import bnb_available, is_quantized, quantization_config
from fedlora.train import train_local

CPU = torch.device("cpu")
BASE = TrainConfig(lr=1e-2, batch_size=8, local_steps=3, max_grad_norm=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tiny_llama_dir(tmp_path_factory.mktemp("m") / "tiny")
    loaded = get_lora_model(str(path), "causal-lm", 4, rank=4, alpha=8.0)
    ds = encode(instruct_records(24, seed=1), loaded.tokenizer, 40, "causal-lm")
    start = init_adapter_state(adapter_state(loaded, 4), seed=5)
    start = {k: v + 0.01 * torch.randn_like(v) if "lora_B" in k else v for k, v in start.items()}
    return path, loaded, ds, start


def _train(loaded, ds, start, cfg, wrap=None):
    load_adapter_state(loaded, 4, start)
    set_trainable(loaded, 4, train_a=True)
    train_local(loaded.peft, ds, cfg, CPU, seed=0, wrap=wrap)
    return adapter_state(loaded, 4)


def _dp_wrap(holder):
    def wrap(model, optimizer, loader):
        # Fixed-size batches and no noise: the DP update is then a deterministic function of
        # the per-sample clipped gradients, so split and unsplit batches can be compared.
        holder["dp"] = make_private_lora(
            model, optimizer, loader, noise_multiplier=0.0, max_grad_norm=0.05, poisson_sampling=False
        )
        return tuple(holder["dp"])

    return wrap


def _close(a, b):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _release(holder):
    holder["dp"].release()


def test_grad_accumulation_gives_the_same_update(tiny):
    _, loaded, ds, start = tiny
    whole = _train(loaded, ds, start, BASE)
    split = _train(loaded, ds, start, replace(BASE, grad_accum_steps=3))
    _close(whole, split)
    assert any(not torch.equal(whole[k], start[k]) for k in start)


def test_grad_accumulation_under_dp_clips_per_sample_and_counts_one_step_per_batch(tiny):
    _, loaded, ds, start = tiny
    one, four = {}, {}
    whole = _train(loaded, ds, start, BASE, _dp_wrap(one))
    _release(one)
    split = _train(loaded, ds, start, replace(BASE, grad_accum_steps=4), _dp_wrap(four))
    _release(four)
    _close(whole, split)
    assert one["dp"].steps_taken() == four["dp"].steps_taken() == BASE.local_steps


def test_gradient_checkpointing_gives_the_same_update_with_and_without_dp(tiny):
    _, loaded, ds, start = tiny
    ckpt = replace(BASE, gradient_checkpointing=True)
    _close(_train(loaded, ds, start, BASE), _train(loaded, ds, start, ckpt))
    plain, checkpointed = {}, {}
    a = _train(loaded, ds, start, BASE, _dp_wrap(plain))
    _release(plain)
    b = _train(loaded, ds, start, ckpt, _dp_wrap(checkpointed))
    _release(checkpointed)
    _close(a, b)
    assert not loaded.peft.get_base_model().is_activation_checkpointing  # switched off after training


def test_quantization_needs_bitsandbytes_and_refuses_mps(monkeypatch):
    with pytest.raises(ModelError, match="MPS"):
        quantization_config("4bit", torch.device("mps"))
    monkeypatch.setattr("fedlora.quantize.bnb_available", lambda: False)
    with pytest.raises(ModelError, match=r"pip install --no-deps bitsandbytes==0\.50\.2"):
        quantization_config("4bit", CPU)


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes (optional) is not installed")
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_dp_training_on_a_quantized_base_moves_only_lora(tiny, bits):
    path, _, ds, _ = tiny
    q = get_lora_model(str(path), "causal-lm", 4, rank=4, alpha=8.0, quantization=bits, device="cpu")
    assert is_quantized(q.peft)
    names = set_trainable(q, 4, train_a=True)
    assert names and all(".lora_" in n for n in names)
    base_before = {n: p.detach().clone() for n, p in q.peft.named_parameters() if not p.requires_grad}
    before = adapter_state(q, 4)
    holder = {}

    def wrap(model, optimizer, loader):
        holder["dp"] = make_private_lora(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
        return tuple(holder["dp"])

    train_local(q.peft, ds, replace(BASE, local_steps=2, grad_accum_steps=2), CPU, seed=0, wrap=wrap)
    gs = holder["dp"].model
    private = [n for n, p in gs.named_parameters() if p.requires_grad]
    assert private and all(".lora_" in n for n in private)
    holder["dp"].release()
    after = adapter_state(q, 4)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(p, base_before[n]) for n, p in q.peft.named_parameters() if n in base_before)


@pytest.mark.skipif(not bnb_available(), reason="bitsandbytes (optional) is not installed")
def test_flora_merge_into_a_4bit_base_is_refused(tiny):
    from fedlora.models import merged_into_base

    path, _, _, _ = tiny
    q = get_lora_model(str(path), "causal-lm", 4, rank=4, alpha=8.0, quantization="4bit", device="cpu")
    module = "base_model.model.model.layers.0.self_attn.q_proj"
    merge = {module + ".lora_A.weight": torch.zeros(2, 32), module + ".lora_B.weight": torch.zeros(32, 2)}
    with pytest.raises(ModelError, match="FLoRA"), merged_into_base(q, merge):
        pass
