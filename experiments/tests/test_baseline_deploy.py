"""The arithmetic and the app bundle behind the plain-Flower-on-SuperNodes benchmark (no SuperNodes)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from experiments.baseline_deploy import (
    PLAIN_PACKAGE,
    build_plain_app,
    fedlora_rounds,
    fedlora_run_config,
    overrides_string,
    parse_overrides,
    plain_rounds,
    speedups,
    steady_state,
)


def test_overrides_round_trip_and_bad_items():
    assert overrides_string({"a.b": "1", "c.d": "x"}) == "a.b=1 c.d=x"
    assert parse_overrides("a.b=1  c.d=x") == {"a.b": "1", "c.d": "x"}
    assert parse_overrides("") == {}
    with pytest.raises(ValueError, match=r"expected section\.key=value"):
        parse_overrides("a.b=1 oops")
    with pytest.raises(ValueError, match="without spaces"):
        overrides_string({"a.b": "two words"})


def test_fedlora_rounds_takes_global_rows_from_round_one():
    rows = [
        {"kind": "global", "round": 0, "seconds": 0.5, "bytes_down": 0, "bytes_up": 0, "test_accuracy": 0.1},
        {"kind": "client", "round": 1, "seconds": 9.0},
        {
            "kind": "global",
            "round": 1,
            "seconds": 7.5,
            "bytes_down": 100,
            "bytes_up": 40,
            "test_accuracy": 0.2,
        },
        {
            "kind": "global",
            "round": 2,
            "seconds": 4.0,
            "bytes_down": 100,
            "bytes_up": 60,
            "test_accuracy": 0.3,
        },
    ]
    assert fedlora_rounds(rows) == [
        {"round": 1, "seconds": 7.5, "bytes": 140, "accuracy": 0.2},
        {"round": 2, "seconds": 4.0, "bytes": 160, "accuracy": 0.3},
    ]


def _train(start: float, down: int = 10, up: int = 12) -> dict:
    return {
        "type": "train",
        "start": start,
        "end": start + 1,
        "bytes_down": down,
        "bytes_up": up,
        "errors": 0,
    }


def test_plain_rounds_span_from_train_send_to_the_end_of_evaluation():
    meter = {
        "calls": [
            _train(100.0),
            {"type": "", "start": 111.0, "end": 111.0, "bytes_down": 0, "bytes_up": 0, "errors": 0},
            _train(113.0, up=20),
        ],
        "evaluations": [
            {"round": 0, "start": 95.0, "end": 98.0, "accuracy": 0.1},
            {"round": 1, "start": 111.0, "end": 112.5, "accuracy": 0.2},
            {"round": 2, "start": 120.0, "end": 121.25, "accuracy": 0.4},
        ],
    }
    assert plain_rounds(meter) == [
        {"round": 1, "seconds": 12.5, "bytes": 22, "accuracy": 0.2, "errors": 0},
        {"round": 2, "seconds": 8.25, "bytes": 30, "accuracy": 0.4, "errors": 0},
    ]
    meter["evaluations"].pop()
    with pytest.raises(ValueError, match="round 2 was sent but never evaluated"):
        plain_rounds(meter)


def test_steady_state_leaves_round_one_out():
    rounds = [{"round": 1, "seconds": 9.0}, {"round": 2, "seconds": 3.0}, {"round": 3, "seconds": 5.0}]
    assert steady_state(rounds) == {"rounds": [2, 3], "median_s": 4.0, "min_s": 3.0}
    assert steady_state(rounds, first=3) == {"rounds": [3], "median_s": 5.0, "min_s": 5.0}
    with pytest.raises(ValueError, match="run at least 2 rounds"):
        steady_state(rounds[:1])


def test_speedups_against_plain_of_the_same_privacy():
    arms = {
        "plain/none": {"steady": {"median_s": 12.0}},
        "fedlora/none": {"steady": {"median_s": 4.0}},
        "plain-poll/none": {"steady": {"median_s": 9.0}},
        "fedlora/record": {"steady": {"median_s": 5.0}},  # no plain/record: left out
    }
    assert speedups(arms) == {"plain/none": 1.0, "fedlora/none": 3.0, "plain-poll/none": pytest.approx(4 / 3)}


def test_both_apps_get_the_same_run_config(tmp_path):
    from server.app import config_from_run_config

    cfg = config_from_run_config(fedlora_run_config(3, 2, "record", tmp_path / "run"))
    assert (cfg.federation.num_clients, cfg.federation.num_rounds) == (2, 3)
    assert (cfg.train.local_steps, cfg.train.batch_size, cfg.federation.strategy) == (10, 16, "fedit")
    assert (cfg.privacy.mode, cfg.privacy.noise_multiplier, cfg.privacy.max_grad_norm) == ("record", 1.0, 1.0)
    assert cfg.output.out_dir == str(tmp_path / "run")
    assert config_from_run_config(fedlora_run_config(3, 2, "none", tmp_path)).privacy.mode == "none"


def test_plain_app_bundle_names_importable_components(tmp_path, monkeypatch):
    app = build_plain_app(tmp_path / "app")
    meta = tomllib.loads((app / "pyproject.toml").read_text())
    components = meta["tool"]["flwr"]["app"]["components"]
    assert components == {
        "serverapp": f"{PLAIN_PACKAGE}.plain_deploy_app:server_app",
        "clientapp": f"{PLAIN_PACKAGE}.plain_deploy_app:client_app",
    }
    assert set(meta["tool"]["flwr"]["app"]["config"]) == {"meter-file", "reply-poll"}
    # What `flwr run` checks before it bundles the app (it finds components by AST, not import).
    from flwr.supercore.object_ref import validate

    for ref in components.values():
        assert validate(ref, check_module=True, project_dir=app) == (True, None), ref
    # The bundle's package imports on its own (relative import of its copy of plain_flower).
    monkeypatch.syspath_prepend(str(app))
    import importlib

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    mod = importlib.import_module(f"{PLAIN_PACKAGE}.plain_deploy_app")
    try:
        assert Path(mod.__file__).parent == app / PLAIN_PACKAGE
        assert isinstance(mod.server_app, ServerApp) and isinstance(mod.client_app, ClientApp)
    finally:
        import sys

        for name in [n for n in sys.modules if n == PLAIN_PACKAGE or n.startswith(PLAIN_PACKAGE + ".")]:
            del sys.modules[name]
