"""LoRA fine-tuning of the real SmolLM2-135M-Instruct on the instruction tasks, with and without DP.

Runs when the optional package is installed (``.ci/run`` installs it); a few examples and
steps, one intra-op thread. The full federated scenario is ``simulations/instruct.toml``.
"""

from dataclasses import replace

import pytest
import torch
from llm_models import requires_smollm2

from fedlora.config import TrainConfig
from fedlora.data.encode import encode
from fedlora.data.instruct import instruct_splits
from fedlora.models import (
    adapter_state,
    get_lora_model,
    init_adapter_state,
    load_adapter_state,
    set_trainable,
)
from fedlora.privacy.dpsgd import check_adapter_moved, make_private_lora
from fedlora.train import evaluate, train_local

pytestmark = requires_smollm2
CPU = torch.device("cpu")
CFG = TrainConfig(lr=5e-3, batch_size=4, local_steps=5)


@pytest.fixture(scope="module")
def smol():
    loaded = get_lora_model("smollm2", "causal-lm", 4, rank=8, alpha=16.0)
    train, test = instruct_splits(24, 8, seed=0)
    encoded = (
        encode(train, loaded.tokenizer, 56, "causal-lm"),
        encode(test, loaded.tokenizer, 56, "causal-lm"),
    )
    return loaded, *encoded


def _fresh(loaded):
    load_adapter_state(loaded, 8, init_adapter_state(adapter_state(loaded, 8), seed=0))
    set_trainable(loaded, 8, train_a=True)


def test_a_few_lora_steps_cut_held_out_response_perplexity(smol):
    loaded, train, test = smol
    assert loaded.target_modules == ("q_proj", "v_proj")
    _fresh(loaded)
    before = evaluate(loaded.peft, test, "causal-lm", CPU, 8)
    train_local(loaded.peft, train, CFG, CPU, seed=0)
    after = evaluate(loaded.peft, test, "causal-lm", CPU, 8)
    assert before.extras["perplexity"] > 10  # the base model answers in sentences, not in the format
    assert after.extras["perplexity"] < before.extras["perplexity"] / 3


def test_record_level_dp_on_the_real_model_trains_only_lora(smol):
    loaded, train, _ = smol
    _fresh(loaded)
    start = adapter_state(loaded, 8)
    holder = {}

    def wrap(model, optimizer, loader):
        holder["dp"] = make_private_lora(model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0)
        return tuple(holder["dp"])

    train_local(loaded.peft, train, replace(CFG, local_steps=2, batch_size=4), CPU, seed=0, wrap=wrap)
    private = [n for n, p in holder["dp"].model.named_parameters() if p.requires_grad]
    assert len(private) == 4 * 30  # A and B of q_proj and v_proj in 30 layers, nothing else
    assert holder["dp"].steps_taken() == 2
    holder["dp"].release()
    check_adapter_moved(start, adapter_state(loaded, 8))
