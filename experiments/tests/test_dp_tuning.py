"""The DP tuning proxy's noise scaling and arm configs, by hand; the scenario's DP plan."""

from __future__ import annotations

import math

import pytest

from experiments.dp_tuning import SCENARIO, Arm, arm_config, client_plan, proxy_sigma
from fedlora.config import load_toml


def test_proxy_sigma_puts_the_federated_noise_on_an_averaged_step():
    # federated: sigma 0.5, B = 128, 4 clients -> noise on the averaged step 0.5 / 128 / 2 = 1/512
    s = proxy_sigma(0.5, 32, 128, 4)
    assert s == pytest.approx(0.0625)  # 0.5 * 32 / (128 * 2)
    assert s / 32 == pytest.approx(0.5 / 128 / math.sqrt(4))
    assert proxy_sigma(0.8, 128, 128, 1) == pytest.approx(0.8)  # same batch, one client: unchanged


def test_arm_config_changes_only_what_the_arm_names():
    cfg = load_toml(SCENARIO)
    same = arm_config(cfg, Arm("as is", 3.0))
    assert same == cfg
    changed = arm_config(cfg, Arm("x", 3.0, lr=0.01, rounds=2, local_steps=3, batch=7, num_train=1000))
    assert (changed.train.lr, changed.train.local_steps, changed.train.batch_size) == (0.01, 3, 7)
    assert (changed.federation.num_rounds, changed.data.num_train) == (2, 1000)
    assert changed.lora == cfg.lora and changed.privacy == cfg.privacy


def test_client_plan_of_a_small_federation():
    cfg = arm_config(load_toml(SCENARIO), Arm("x", 3.0, num_train=1000, rounds=3, local_steps=4))
    per_client = 1000 // cfg.federation.num_clients
    local, steps = client_plan(cfg)
    assert local == per_client - int(per_client * cfg.data.local_val_fraction)
    assert steps == 12
