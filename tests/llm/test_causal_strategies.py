"""Every aggregation strategy on the causal-LM path: clients train a tiny Llama, the server scores.

No Flower here (the rounds are driven by hand, as the server loop does), so the causal-LM
specifics are what is tested: adapters without a head, base merges (FLoRA), perplexity and
greedy exact-match on the generated instruction tasks, and the samples file.
"""

import json

import pytest
import torch
from llm_models import tiny_llama_dir

from fedlora.config import RunConfig, with_overrides
from fedlora.data.encode import encode
from fedlora.data.instruct import instruct_records
from fedlora.models import adapter_state, get_lora_model, load_adapter_state, merged_into_base, set_trainable
from fedlora.train import train_local
from server.evaluator import SAMPLES_FILE, ServerModel
from strategies.base import ClientResult, ClientSpec
from strategies.registry import available, create

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    model_dir = tiny_llama_dir(root / "tiny")
    cfg = with_overrides(
        RunConfig(),
        {
            "model.name": str(model_dir),
            "model.task": "causal-lm",
            "model.max_length": 40,
            "data.source": "instruct",
            "data.num_train": 16,
            "data.num_test": 4,
            "lora.rank": 4,
            "train.lr": 0.01,
            "train.local_steps": 1,
            "train.batch_size": 4,
            "train.device": "cpu",
        },
    )
    return cfg, root


@pytest.mark.parametrize("name", available())
def test_strategy_rounds_on_a_causal_lm(setup, name):
    cfg, root = setup
    out = root / name
    cfg = with_overrides(cfg, {"federation.strategy": name, "output.out_dir": str(out)})
    from fedlora.data.sources import load_task_data

    data = load_task_data(cfg.data, "causal-lm")
    server = ServerModel(cfg, data.labels, data.test)
    strategy = create(name)
    specs = [ClientSpec(node_id=i, rank=4, alpha=8.0) for i in (1, 2)]
    state = strategy.init_state(server.template(4, seed=0), specs)
    loaded = get_lora_model(cfg.model.name, "causal-lm", 4, 4, 8.0)
    shards = [instruct_records(8, seed=s) for s in (1, 2)]
    for rnd in (1, 2):
        results = []
        for spec, records in zip(specs, shards, strict=True):
            pay = strategy.payload(state, spec)
            start = {**adapter_state(loaded, 4), **pay.adapter}
            load_adapter_state(loaded, 4, start)
            set_trainable(loaded, 4, pay.train_a)
            with merged_into_base(loaded, pay.merge):
                ds = encode(records, loaded.tokenizer, 40, "causal-lm")
                train_local(loaded.peft, ds, cfg.train, CPU, seed=rnd)
            results.append(ClientResult(spec, len(records), adapter_state(loaded, 4)))
        state = strategy.aggregate(state, results)
        final = strategy.final_adapter(state, ClientSpec(node_id=0, rank=4, alpha=8.0))
        ev = server.evaluate(final, strategy.final_merge(state), rnd)
        assert torch.isfinite(torch.tensor(ev.loss))
        assert ev.extras["test_perplexity"] > 1.0 and 0.0 <= ev.extras["test_exact_match"] <= 1.0
        assert all(not (".score." in k or "classifier" in k) for k in final)
    rows = [json.loads(line) for line in (out / SAMPLES_FILE).read_text().splitlines()]
    assert [r["round"] for r in rows] == [1] * 4 + [2] * 4
    assert {"instruction", "reference", "answer", "exact"} <= set(rows[0])
