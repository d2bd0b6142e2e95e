"""Under record DP a client's work, and what it reports about time, must not depend on its records.

The attack: training trimmed padding, so a step cost the longest record of its Poisson batch;
with 47 short records and one 512-token record a client's train-seconds told the server
whether the long record was there (AUC 1.00). Under DP every step now runs the same tensor
shapes (no trimming, a fixed row count whatever the Poisson sample drew), and no timing leaves
the node.
"""

import torch
from privacy_models import tiny_peft_bert
from torch.utils.data import TensorDataset

from fedlora.config import TrainConfig
from fedlora.privacy.dpsgd import make_private_lora
from fedlora.privacy.randomness import SecureRandom
from fedlora.train import train_local

CPU = torch.device("cpu")


def records(long_one: bool, n: int = 24, seq: int = 32) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (n, seq), generator=g)
    mask = torch.zeros(n, seq, dtype=torch.long)
    mask[:, :4] = 1  # short records: 4 real tokens, the rest padding
    if long_one:
        mask[5, :] = 1  # one record uses the whole length
    labels = torch.randint(0, 2, (n,), generator=g)
    return TensorDataset(ids * mask, mask, labels)


def shapes_seen(dataset: TensorDataset, private: bool, steps: int = 12) -> set[tuple[int, ...]]:
    model = tiny_peft_bert()
    seen: set[tuple[int, ...]] = set()
    model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.add(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    cfg = TrainConfig(batch_size=4, local_steps=steps, lr=1e-3, warmup_steps=0)

    def wrap(m, o, loader):
        return tuple(
            make_private_lora(m, o, loader, noise_multiplier=1.0, max_grad_norm=1.0, generator=SecureRandom())
        )

    train_local(model, dataset, cfg, CPU, seed=0, wrap=wrap if private else None, steps=steps)
    return seen


def test_without_dp_steps_follow_the_longest_record():
    # The channel exists without DP (and is fine there: nothing is promised).
    assert {s[1] for s in shapes_seen(records(False), private=False)} == {4}
    assert 32 in {s[1] for s in shapes_seen(records(True), private=False)}


def test_under_dp_every_step_runs_one_shape_with_or_without_the_long_record():
    short = shapes_seen(records(False), private=True)
    with_long = shapes_seen(records(True), private=True)
    assert len(short) == 1 and short == with_long
    rows, cols = next(iter(short))
    assert cols == 32 and rows > 4  # full length; a fixed row count above the mean Poisson batch


def test_dp_replies_carry_no_timing_and_no_unnoised_scores(task_identity):
    from clients.app import app
    from tests.test_client_app import _cfg, _context, _template, _train_msg

    cfg = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 1.0})
    metrics = dict(app(_train_msg(cfg, _template()), _context()).content["metrics"])
    assert metrics["dp-steps"] == 2
    leaked = {k for k in metrics if k.endswith("-seconds") or k in ("train-loss", "local-val-loss")}
    assert not leaked, leaked
    plain = dict(app(_train_msg(_cfg(), _template()), _context()).content["metrics"])
    assert "train-seconds" in plain and "train-loss" in plain  # without DP they are reported


def test_a_declined_dp_round_carries_no_timing_and_does_no_encoding(task_identity, monkeypatch):
    # A declined round's reply used to carry clientapp-seconds, which included tokenising every record.
    import clients.round
    from clients.app import app
    from clients.worker import round_metrics
    from tests.test_client_app import _cfg, _context, _template, _train_msg

    encoded = []
    real_encode = clients.round.encode
    monkeypatch.setattr(clients.round, "encode", lambda *a, **k: encoded.append(1) or real_encode(*a, **k))
    cfg = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 0.3, "privacy.epsilon": 0.01})
    reply = round_metrics(app(_train_msg(cfg, _template()), _context(**{"dp-epsilon": 0.01})).content)
    metrics = dict(reply["metrics"])
    assert reply["metrics"] is not None and metrics.get("dp-record") == 1
    assert not any(k.endswith("-seconds") for k in metrics), metrics
    assert encoded == []  # the budget decision came before any work on the records


def test_under_dp_one_huge_record_is_cut_before_tokenising():
    from clients.privacy import TEXT_CHARS_PER_TOKEN, bounded_text
    from fedlora.config import RunConfig, with_overrides

    cfg = with_overrides(RunConfig(), {"model.max_length": 32})
    records = [{"text": "a b " * 500_000, "label": "x"}, {"text": "short", "label": "y"}]
    cut = bounded_text(records, cfg)
    assert len(cut[0]["text"]) == TEXT_CHARS_PER_TOKEN * 32 and cut[1] == records[1]
