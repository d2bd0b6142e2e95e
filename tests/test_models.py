import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification

from fedlora.adapters import is_lora_a, is_lora_b, split_state
from fedlora.config import DataConfig, TrainConfig
from fedlora.data.encode import IGNORE_INDEX, encode
from fedlora.data.sources import load_task_data
from fedlora.export import save_peft_adapter
from fedlora.models import (
    ModelError,
    adapter_state,
    detect_target_modules,
    get_lora_model,
    init_adapter_state,
    load_adapter_state,
    merged_into_base,
    resolve_model_path,
    set_trainable,
)
from fedlora.train import evaluate, train_local
from tests.llm.llm_models import tiny_llama_dir


@pytest.fixture(scope="module")
def minilm():
    return get_lora_model("minilm", "classification", 4, rank=4, alpha=8.0)


def test_packaged_model_gets_bert_targets_and_peft_names(minilm):
    assert minilm.target_modules == ("query", "value")
    state = adapter_state(minilm, 4)
    pairs, rest = split_state(state)
    assert len(pairs) == 12  # 6 layers x (query, value)
    assert set(rest) == {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    a = state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"]
    b = state["base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"]
    assert a.shape == (4, 384) and b.shape == (384, 4)


def test_seeded_init_is_identical_across_calls_and_name_keyed(minilm):
    template = adapter_state(minilm, 4)
    one, two = init_adapter_state(template, 7), init_adapter_state(dict(reversed(template.items())), 7)
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert all(torch.count_nonzero(v) == 0 for k, v in one.items() if is_lora_b(k))
    assert all(v.abs().max() <= 1 / 384**0.5 for k, v in one.items() if is_lora_a(k))
    other = init_adapter_state(template, 8)
    assert not torch.equal(
        one[next(k for k in one if is_lora_a(k))], other[next(k for k in other if is_lora_a(k))]
    )


def test_adapters_of_different_ranks_share_one_base(minilm):
    other = get_lora_model("minilm", "classification", 4, rank=2, alpha=4.0)
    assert other.peft is minilm.peft
    assert set(other.adapters) >= {2, 4}
    pairs, _ = split_state(adapter_state(other, 2))
    assert {p.rank for p in pairs.values()} == {2}
    get_lora_model("minilm", "classification", 4, rank=4, alpha=8.0)


def test_load_adapter_rejects_wrong_names_and_shapes(minilm):
    state = adapter_state(minilm, 4)
    key = next(iter(state))
    with pytest.raises(ModelError, match="shape"):
        load_adapter_state(minilm, 4, {key: torch.zeros(3, 3)})
    with pytest.raises(ModelError, match=r"not part of this model"):
        load_adapter_state(minilm, 4, {"base_model.model.nope.lora_A.weight": torch.zeros(1)})


def test_trainable_set_excludes_base_and_optionally_a(minilm):
    names = set_trainable(minilm, 4, train_a=False)
    assert names and not any(".lora_A." in n for n in names)
    assert not any("base_layer" in n for n in names)
    names = set_trainable(minilm, 4, train_a=True)
    assert any(".lora_A." in n for n in names)
    total = sum(p.numel() for p in minilm.peft.parameters() if p.requires_grad)
    assert total == 12 * (4 * 384 * 2) + 4 * 384 + 4


def test_merge_into_base_is_temporary_and_exact(minilm):
    module = "base_model.model.bert.encoder.layer.0.attention.self.query"
    layer = minilm.peft.base_model.model.bert.encoder.layer[0].attention.self.query.get_base_layer()
    before = layer.weight.detach().clone()
    gen = torch.Generator().manual_seed(0)
    b, a = torch.randn(384, 3, generator=gen), torch.randn(3, 384, generator=gen)
    with merged_into_base(minilm, {module + ".lora_A.weight": a, module + ".lora_B.weight": b}):
        assert torch.allclose(layer.weight - before, b @ a, atol=1e-5)
    assert torch.equal(layer.weight, before)


def test_peft_export_loads_with_plain_peft_and_reproduces_outputs(tmp_path, minilm):
    state = init_adapter_state(adapter_state(minilm, 4), 3)
    gen = torch.Generator().manual_seed(0)
    state = {
        k: (v + 0.01 * torch.randn(v.shape, generator=gen) if is_lora_b(k) else v) for k, v in state.items()
    }
    load_adapter_state(minilm, 4, state)
    minilm.peft.eval()
    data = load_task_data(DataConfig(num_train=8, num_test=16), "classification")
    ds = encode(data.test, minilm.tokenizer, 32, "classification")
    ids, mask, _ = ds.tensors
    with torch.no_grad():
        ours = minilm.peft(input_ids=ids, attention_mask=mask).logits
    out = save_peft_adapter(
        tmp_path / "adapter",
        state,
        base_model="minilm",
        task="classification",
        alpha=8.0,
        target_modules=minilm.target_modules,
        head_modules=minilm.head_modules,
    )
    base = AutoModelForSequenceClassification.from_pretrained(resolve_model_path("minilm"), num_labels=4)
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    with torch.no_grad():
        theirs = plain(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_unknown_architecture_needs_explicit_targets():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    with pytest.raises(ModelError, match=r"set lora\.target_modules"):
        detect_target_modules(model)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("./no/such/model")


def test_causal_lm_path_on_tiny_llama(tmp_path):
    path = tiny_llama_dir(tmp_path / "tiny-llama")
    loaded = get_lora_model(str(path), "causal-lm", 2, rank=4, alpha=8.0)
    assert loaded.target_modules == ("q_proj", "v_proj") and loaded.head_modules == ()
    records = [
        {"instruction": f"repeat {w}", "response": f"{w} {w}"} for w in ["red", "blue", "green", "gold"] * 8
    ]
    ds = encode(records, loaded.tokenizer, 24, "causal-lm")
    labels = ds.tensors[2]
    assert (labels[0][:3] == IGNORE_INDEX).all() and (labels[0] != IGNORE_INDEX).any()
    set_trainable(loaded, 4, train_a=True)
    before = evaluate(loaded.peft, ds, "causal-lm", torch.device("cpu"))
    start = adapter_state(loaded, 4)
    train_local(
        loaded.peft, ds, TrainConfig(lr=3e-2, local_steps=40, batch_size=8), torch.device("cpu"), seed=0
    )
    after = evaluate(loaded.peft, ds, "causal-lm", torch.device("cpu"))
    assert after.loss < before.loss - 0.2
    moved = adapter_state(loaded, 4)
    assert any(not torch.equal(start[k], moved[k]) for k in start if is_lora_b(k))
    assert set(moved) == set(start) and all(".lora_" in k for k in moved)
