"""Task and max_length derived from the model and the data (fedlora/derive.py), and the checks at encoding."""

import json
import logging

import pytest
import torch
from transformers import AutoTokenizer

from fedlora.config import DataConfig, RunConfig, load_toml, with_overrides
from fedlora.data.encode import encode_causal
from fedlora.data.sources import DataError
from fedlora.derive import (
    Cuts,
    check_cuts,
    check_task_fits,
    choose_max_length,
    cut_counts,
    derive_config,
    infer_task,
    task_from_columns,
)
from fedlora.models import resolve_model_path
from fedlora.train import evaluate
from server.loop import derived_timeout
from simulations.runner import DEFAULT_SCENARIO

D = DataConfig()


def test_task_follows_the_columns():
    assert task_from_columns({"instruction", "response", "id"}, D, "f") == "causal-lm"
    assert task_from_columns({"text", "label"}, D, "f") == "classification"
    custom = DataConfig(text_column="review", label_column="stars")
    assert task_from_columns({"review", "stars"}, custom, "f") == "classification"


@pytest.mark.parametrize("columns", [{"text", "label", "instruction", "response"}, {"question", "answer"}])
def test_ambiguous_or_unknown_columns_name_the_flags(columns):
    with pytest.raises(DataError) as err:
        task_from_columns(columns, D, "data.jsonl")
    for needle in ("--task", "--text-column", "--label-column", "data.instruction_column", "'data.jsonl'"):
        assert needle in str(err.value)


def test_infer_task_reads_a_file_and_the_generated_sources(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"instruction": "a", "response": "b"}) + "\n")
    assert infer_task(DataConfig(source=str(path))) == "causal-lm"
    assert infer_task(DataConfig(source="embedded")) == "classification"
    assert infer_task(DataConfig(source="instruct")) == "causal-lm"


def test_max_length_keeps_nearly_every_example_whole():
    assert choose_max_length([10] * 99 + [11], None) == 16  # longest within 1.5x: all whole
    assert choose_max_length([10] * 199 + [500, 500], None) == 16  # far outliers (1%) are cut
    assert choose_max_length([3, 4], None) == 8
    assert choose_max_length([900], 512) == 512  # never beyond the model's context


def test_cut_counts_tell_emptied_from_partly_cut():
    # at 8 tokens: prompt 10 -> emptied; prompts 6 and 5 with longer totals -> partly; 2 of 7 -> whole
    assert cut_counts([10, 6, 5, 2], [12, 9, 20, 7], 8) == Cuts(4, 1, 2)
    assert cut_counts([0, 0], [40, 5], 8) == Cuts(2, 0, 1)


def test_check_cuts_refuses_emptied_with_count_and_fix_and_warns_partly(caplog):
    with pytest.raises(DataError, match=r"2 of 5 .* zero target tokens.*model.max_length=60"):
        check_cuts(Cuts(5, 2, 1), 32, 60, "train")
    with caplog.at_level(logging.WARNING):
        check_cuts(Cuts(5, 0, 3), 32, 60, "train")
    assert "3 of 5 train examples are cut" in caplog.text


def test_encoder_is_refused_for_causal_lm():
    with pytest.raises(DataError, match=r"encoder.*--model smollm2"):
        check_task_fits("causal-lm", "bert", "minilm")
    check_task_fits("classification", "bert", "minilm")
    check_task_fits("causal-lm", "llama", "x")


@pytest.fixture(scope="module")
def tokenizer():
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    tok.eos_token = "[SEP]"
    return tok


def test_encoding_refuses_a_response_cut_away_entirely(tokenizer):
    records = [{"instruction": "one two three four five six seven eight", "response": "nine ten"}]
    encode_causal(records, tokenizer, 32)
    with pytest.raises(DataError, match="1 of 1 encoded examples lose their whole response"):
        encode_causal(records, tokenizer, 8)


def test_evaluation_over_zero_tokens_is_an_error():
    ids = torch.ones(2, 6, dtype=torch.long)
    data = torch.utils.data.TensorDataset(ids, ids, torch.full((2, 6), -100))
    model = torch.nn.Module()
    model.forward = lambda input_ids, attention_mask: type("O", (), {"logits": torch.zeros(2, 6, 5)})()
    with pytest.raises(ValueError, match="zero response tokens"):
        evaluate(model, data, "causal-lm", torch.device("cpu"))


def test_default_scenario_pins_nothing_model_specific():
    cfg = load_toml(DEFAULT_SCENARIO)
    assert (cfg.model.task, cfg.model.max_length, cfg.lora.target_modules) == ("auto", 0, ())


def test_derive_on_the_default_scenario_and_a_set_value_kept(tmp_path):
    cfg, notes = derive_config(load_toml(DEFAULT_SCENARIO))
    assert cfg.model.task == "classification" and 16 <= cfg.model.max_length <= 64
    assert any("max_length" in n for n in notes)
    fixed = with_overrides(RunConfig(), {"model.task": "classification", "model.max_length": 40})
    assert derive_config(fixed) == (fixed, [])


def test_derived_round_timeout():
    assert derived_timeout(0.0) is None  # nothing measured: wait for every reply
    assert derived_timeout(10.0) == 300.0
    assert derived_timeout(100.0) == 1000.0


def test_data_of_a_config_not_yet_derived_follows_its_columns(tmp_path):
    from fedlora.data.sources import load_task_data

    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"instruction": f"q{i}", "response": f"a{i}"}) for i in range(10)]
    path.write_text("\n".join(rows) + "\n")
    data = load_task_data(DataConfig(source=str(path)), "auto")
    assert data.train[0].keys() == {"instruction", "response"} and data.labels == ()
    assert load_task_data(DataConfig(num_train=20, num_test=5), "auto").labels  # embedded: classification
