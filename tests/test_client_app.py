"""The ClientApp called in-process with real Flower messages (no simulation engine)."""

import json
import re
from contextlib import contextmanager

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict

from clients.app import NodeRefused, app
from clients.round import PayloadError
from fedlora.adapters import fingerprint, is_lora_a, is_lora_b
from fedlora.config import RunConfig, with_overrides
from fedlora.models import adapter_state, get_lora_model, init_adapter_state
from fedlora.protocol import QUERY, TRAIN, decode_arrays
from fedlora.protocol import encode_arrays as to_record

LABELS = ["person", "animal", "vehicle", "robot"]


@contextmanager
def refused(cause: type[Exception], match: str):
    """Expect the ClientApp to refuse with a generic reason, the cause (``match``) only chained."""
    with pytest.raises(NodeRefused) as err:
        yield
    assert isinstance(err.value.__cause__, cause) and re.search(match, str(err.value.__cause__))
    assert not re.search(match, str(err.value)), "the details stay in the node's log"


def from_record(record):
    return decode_arrays(record, max_bytes=2**30)


@pytest.fixture(autouse=True)
def _task_identity(task_identity):
    # Flower stamps messages with the running task's identity (restored by the conftest fixture).
    return task_identity


def _cfg(**over) -> RunConfig:
    base = {
        "data.num_train": 80,
        "data.num_test": 20,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "federation.num_clients": 2,
        "lora.rank": 4,
    }
    return with_overrides(RunConfig(), {**base, **over})


def _context(pid=0, n=2, **node):
    return Context(
        run_id=1,
        node_id=pid + 10,
        node_config={"partition-id": pid, "num-partitions": n, **node},
        state=RecordDict(),
        run_config={},
    )


def _template(rank=4):
    return init_adapter_state(
        adapter_state(get_lora_model("minilm", "classification", 4, rank, 2.0 * rank), rank), 0
    )


def _train_msg(cfg, adapter, rank=4, round=1, **conf):
    content = RecordDict(
        {
            "adapter": to_record(adapter),
            "config": ConfigRecord(
                {
                    "run-config": cfg.to_json(),
                    "labels": json.dumps(LABELS),
                    "round": round,
                    "rank": rank,
                    "alpha": 2.0 * rank,
                    "seed": 0,
                    "train-a": True,
                    **conf,
                }
            ),
        }
    )
    return Message(content, dst_node_id=10, message_type=TRAIN)


def test_query_reports_rank_from_node_config():
    cfg = _cfg()
    msg = Message(
        RecordDict({"config": ConfigRecord({"run-config": cfg.to_json(), "labels": json.dumps(LABELS)})}),
        dst_node_id=10,
        message_type=QUERY,
    )
    info = app(msg, _context(pid=1, **{"lora-rank": 16})).content["info"]
    assert info["rank"] == 16 and info["alpha"] == 32.0 and info["num-examples"] == 36


def test_train_round_sends_only_adapter_deltas():
    cfg = _cfg()
    start = _template()
    reply = app(_train_msg(cfg, start), _context())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    upd = from_record(reply.content["update"])
    assert set(upd) == set(start)  # adapter + head only: no base weights travel
    assert all(".lora_" in k or ".classifier." in k for k in upd)
    assert any(torch.count_nonzero(v) for k, v in upd.items() if is_lora_b(k))
    m = reply.content["metrics"]
    assert m["num-examples"] == 36 and m["steps"] == 2 and m["bytes-up"] > 0


def test_ffa_client_trains_only_b_and_checks_shared_a():
    cfg = _cfg()
    start = _template()
    no_a = {k: v for k, v in start.items() if not is_lora_a(k)}
    fp = fingerprint({k: v for k, v in start.items() if is_lora_a(k)})
    reply = app(_train_msg(cfg, no_a, **{"train-a": False, "a-fingerprint": fp}), _context())
    assert not reply.has_error()
    upd = from_record(reply.content["update"])
    assert not any(is_lora_a(k) for k in upd) and any(is_lora_b(k) for k in upd)
    with refused(PayloadError, "fingerprint mismatch"):
        app(_train_msg(cfg, no_a, **{"train-a": False, "a-fingerprint": "0" * 64}), _context())


def test_client_refuses_wrong_rank_and_non_finite_payload():
    cfg = _cfg()
    with refused(PayloadError, "configured for rank 4"):
        app(_train_msg(cfg, _template(8), rank=8), _context())
    start = _template()
    key = next(k for k in start if is_lora_b(k))
    start[key] = torch.full_like(start[key], float("nan"))
    with refused(PayloadError, "non-finite"):
        app(_train_msg(cfg, start), _context())


@pytest.mark.parametrize("pid", [0, 1])
def test_partitions_differ_between_nodes(pid):
    from clients.node import local_data, node_settings
    from fedlora.derive import derive_config

    cfg = derive_config(_cfg())[0]  # the task, as the ClientApp derives it
    train, _ = local_data(cfg, node_settings(cfg, {"partition-id": pid, "num-partitions": 2}), tuple(LABELS))
    other, _ = local_data(
        cfg, node_settings(cfg, {"partition-id": 1 - pid, "num-partitions": 2}), tuple(LABELS)
    )
    assert not {r["text"] for r in train} & {r["text"] for r in other}


def test_record_level_dp_round_moves_adapter_and_keeps_ledger_in_state():
    cfg = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 1.0, "train.local_steps": 3})
    start = _template()
    ctx = _context()
    reply = app(_train_msg(cfg, start), ctx)
    upd = from_record(reply.content["update"])
    # opacus#820 guard: DP training must really change the LoRA factors.
    assert any(torch.count_nonzero(v) for k, v in upd.items() if is_lora_b(k))
    m = reply.content["metrics"]
    assert m["dp-steps"] == 3 and m["dp-noise-multiplier"] == 1.0 and m["dp-sample-rate"] == 0.2
    # 36 local examples in batches of 8: q = 1/5. Opacus' PRV accountant (the configured one),
    # called here directly, gives the epsilon the client must report.
    first_eps = m["dp-epsilon"]
    assert first_eps == pytest.approx(opacus_prv([(1.0, 0.2, 3)]), rel=1e-6)
    ledger = json.loads(str(reply.content["privacy"]["ledger"]))
    assert [e["round"] for e in ledger["entries"]] == [1]
    # Round 2 on the same context: the accountant continues from the persisted ledger.
    reply2 = app(_train_msg(cfg, start, round=2), ctx)
    second_eps = reply2.content["metrics"]["dp-epsilon"]
    assert second_eps == pytest.approx(opacus_prv([(1.0, 0.2, 3), (1.0, 0.2, 3)]), rel=1e-6)
    assert second_eps > first_eps
    ledger2 = json.loads(str(reply2.content["privacy"]["ledger"]))
    assert [e["round"] for e in ledger2["entries"]] == [1, 2]


def opacus_prv(history, delta=1e-5):
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = list(history)
    return acc.get_epsilon(delta=delta, eps_error=0.01)


def test_sigma_is_calibrated_once_per_run_and_node(monkeypatch):
    import clients.privacy
    from fedlora.privacy.calibrate import calibrate_noise_multiplier

    calls = []

    def counting(*args, **kwargs):
        calls.append(args)
        return calibrate_noise_multiplier(*args, **kwargs)

    monkeypatch.setattr(clients.privacy, "calibrate_noise_multiplier", counting)
    cfg = _cfg(
        **{
            "privacy.mode": "record",
            "privacy.epsilon": 8.0,
            "privacy.accountant": "rdp",
            "train.local_steps": 1,
            "federation.num_rounds": 3,
        }
    )
    ctx = _context()
    sigmas = [
        app(_train_msg(cfg, _template(), round=r), ctx).content["metrics"]["dp-noise-multiplier"]
        for r in (1, 2)
    ]
    # One calibration for the whole planned run (3 rounds x 1 step at q = 1/5), reused in round 2.
    assert calls == [(8.0, 1e-5, 0.2, 3)]
    assert sigmas[0] == sigmas[1] == calibrate_noise_multiplier(8.0, 1e-5, 0.2, 3, accountant="rdp")
    # Another node (other partition, own context) calibrates for itself.
    app(_train_msg(cfg, _template()), _context(pid=1))
    assert len(calls) == 2


def test_flora_client_refuses_a_merge_that_does_not_match_the_fingerprint():
    cfg = _cfg(**{"train.local_steps": 1})
    start = _template()
    module = "base_model.model.bert.encoder.layer.0.attention.self.query"
    gen = torch.Generator().manual_seed(0)
    merge = {
        f"{module}.lora_A.weight": torch.randn(2, 384, generator=gen),
        f"{module}.lora_B.weight": torch.randn(384, 2, generator=gen),
    }

    def msg(fp):
        m = _train_msg(cfg, start, **{"fresh-adapter": True, "base-fingerprint": fp})
        m.content["merge"] = to_record(merge)
        return m

    tampered = {**merge, f"{module}.lora_B.weight": merge[f"{module}.lora_B.weight"] + 1e-3}
    with refused(PayloadError, "base update fingerprint mismatch"):
        app(msg(fingerprint(tampered)), _context())
    reply = app(msg(fingerprint(merge)), _context())
    assert not reply.has_error() and "update" in reply.content.array_records


def test_flora_client_refuses_a_fingerprint_whose_merge_record_was_dropped():
    # A relay that strips the merge record must not make the node train on the wrong base.
    cfg = _cfg(**{"train.local_steps": 1})
    module = "base_model.model.bert.encoder.layer.0.attention.self.query"
    gen = torch.Generator().manual_seed(1)
    merge = {
        f"{module}.lora_A.weight": torch.randn(2, 384, generator=gen),
        f"{module}.lora_B.weight": torch.randn(384, 2, generator=gen),
    }
    stripped = _train_msg(cfg, _template(), **{"fresh-adapter": True, "base-fingerprint": fingerprint(merge)})
    with refused(PayloadError, "missing or altered merge record"):
        app(stripped, _context())
    # Round 1 of FLoRA: an empty merge is announced as fingerprint({}) and needs no record.
    first = _train_msg(cfg, _template(), **{"fresh-adapter": True, "base-fingerprint": fingerprint({})})
    assert not app(first, _context()).has_error()


def test_client_without_local_validation_records_trains_and_reports_no_validation_scores():
    # 40 records at local_val_fraction 0.01 leave int(0.4) = 0 validation records.
    cfg = _cfg(**{"train.local_steps": 1, "data.local_val_fraction": 0.01})
    reply = app(_train_msg(cfg, _template()), _context())
    metrics = reply.content["metrics"]
    assert "update" in reply.content.array_records
    assert "local-val-accuracy" not in metrics and "local-val-loss" not in metrics
    assert metrics["steps"] == 1


def test_client_declines_a_round_that_would_exceed_its_budget(tmp_path):
    # sigma 0.6 spends far more than epsilon 0.5 in one round: the client must sit it out.
    cfg = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 0.6, "privacy.epsilon": 0.5})
    reply = app(_train_msg(cfg, _template()), _context(**{"state-dir": str(tmp_path)}))
    assert "update" not in reply.content.array_records
    assert reply.content["metrics"]["declined"] == 1
    assert "past the budget 0.5" in str(reply.content["privacy"]["declined-reason"])


def test_dp_ledger_survives_a_node_restart_through_its_state_dir(tmp_path):
    cfg = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 1.0})
    app(_train_msg(cfg, _template()), _context(**{"state-dir": str(tmp_path)}))
    assert (tmp_path / "privacy_ledger.json").is_file()
    # A fresh context (restarted node) continues from the file instead of starting over.
    reply = app(_train_msg(cfg, _template(), round=2), _context(**{"state-dir": str(tmp_path)}))
    ledger = json.loads(str(reply.content["privacy"]["ledger"]))
    assert [e["round"] for e in ledger["entries"]] == [1, 2]


def test_train_seconds_time_the_optimiser_steps_and_val_seconds_the_local_validation(monkeypatch):
    import time

    import clients.round

    results, real_train, real_eval = [], clients.round.train_local, clients.round.evaluate

    def train_local(*args, **kwargs):
        results.append(real_train(*args, **kwargs))
        return results[-1]

    def slow_validation(*args, **kwargs):
        time.sleep(0.2)  # a validation that takes measurably long
        return real_eval(*args, **kwargs)

    monkeypatch.setattr(clients.round, "train_local", train_local)
    monkeypatch.setattr(clients.round, "evaluate", slow_validation)
    reply = app(_train_msg(_cfg(), _template()), _context())
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content["metrics"]
    assert m["train-seconds"] == pytest.approx(results[0].seconds, abs=1e-9)  # the steps, nothing else
    assert m["val-seconds"] >= 0.2
