import argparse
import tomllib
from pathlib import Path

import pytest

from fedlora import cli
from fedlora.config import (
    ALIASES,
    NODE_FIELDS,
    ConfigError,
    RunConfig,
    field_specs,
    from_json,
    load_toml,
    to_toml,
    with_overrides,
)
from simulations.runner import DEFAULT_SCENARIO


def test_defaults_round_trip_through_json_and_toml(tmp_path):
    cfg = load_toml(DEFAULT_SCENARIO)
    assert from_json(cfg.to_json()) == cfg
    p = tmp_path / "c.toml"
    p.write_text(to_toml(cfg))
    assert load_toml(p) == cfg


def test_overrides_accept_flower_style_keys_and_strings():
    cfg = with_overrides(
        RunConfig(),
        {
            "num-server-rounds": "3",
            "train.lr": "0.01",
            "lora.ranks": "4,8,16",
            "federation.strategy-params": '{"lam": 0.1}',
            "output.resume": "true",
        },
    )
    assert cfg.federation.num_rounds == 3
    assert cfg.train.lr == 0.01
    assert cfg.lora.ranks == (4, 8, 16)
    assert cfg.federation.strategy_params == {"lam": 0.1}
    assert cfg.output.resume is True
    assert [cfg.rank_of(i) for i in range(4)] == [4, 8, 16, 4]


@pytest.mark.parametrize(
    ("key", "value", "needle"),
    [
        ("train.lr", "-1", "train.lr = -1.0"),
        ("train.batch_size", "many", "train.batch_size = 'many'"),
        ("train.batch_size", "2.5", "expected an integer"),
        ("model.task", "translation", "one of 'auto', 'classification', 'causal-lm'"),
        ("data.partitioner", "random", "'iid', 'dirichlet', 'shards'"),
        ("federation.min_replies", "9", "1 to num_clients"),
        ("lora.dropout", "1.5", "[0, 1)"),
        ("privacy.delta", "0.3", "(0, 1e-3]"),
        ("train.bogus", "1", "allowed keys in [train]"),
        ("bogus", "1", "use 'section.field'"),
        ("nosuch.key", "1", "allowed are"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(key, value, needle):
    with pytest.raises(ConfigError) as err:
        with_overrides(RunConfig(), {key: value})
    assert needle in str(err.value)


def test_dp_mode_requires_epsilon_or_noise():
    with pytest.raises(ConfigError, match="target epsilon or a noise multiplier"):
        with_overrides(RunConfig(), {"privacy.mode": "record"})
    cfg = with_overrides(RunConfig(), {"privacy.mode": "record", "dp-epsilon": 3})
    assert cfg.privacy.epsilon == 3.0


def test_toml_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nlr = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("[trainer]\nlr = 1\n")
    with pytest.raises(ConfigError, match=r"unknown config section \[trainer\]"):
        load_toml(unknown)


def test_alpha_defaults_to_constant_scale():
    cfg = RunConfig()
    assert cfg.lora.alpha_for(4) / 4 == cfg.lora.alpha_for(16) / 16 == 2.0
    fixed = with_overrides(cfg, {"lora.alpha": 32})
    assert fixed.lora.alpha_for(4) == 32.0


# --- the configuration surface is declared once (fedlora/config.py field metadata) ---

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
RUN_CONFIG_ONLY = {"scenario", "overrides"}  # read by server/app.py itself, not config fields


def test_every_field_declares_help_and_unique_names():
    specs = field_specs()
    assert len(specs) == len({s.key for s in specs}) > 40
    for s in specs:
        assert s.help, f"{s.key} declares no help"
        if s.choices:
            assert s.default in s.choices, s.key
    for attr in ("flag", "alias", "node"):
        names = [getattr(s, attr) for s in specs if getattr(s, attr)]
        assert len(names) == len(set(names)), f"duplicate {attr}: {names}"


def test_pyproject_run_config_keys_are_the_declared_aliases():
    table = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    assert set(table) - RUN_CONFIG_ONLY == set(ALIASES)
    from server.app import config_from_run_config

    # Every alias at its pyproject value means "as the scenario says".
    assert config_from_run_config(table) == load_toml(DEFAULT_SCENARIO)


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_each_alias_reaches_its_field(alias):
    spec = {s.key: s for s in field_specs()}[ALIASES[alias]]
    value = {bool: True, int: 3, float: 0.25, str: spec.choices[-1] if spec.choices else "x"}[spec.hint]
    if spec.key == "federation.strategy":
        value = "ffa"
    if spec.key == "privacy.delta":
        value = 1e-4  # delta is capped at 1e-3
    extra = {"privacy.noise_multiplier": 1.0} if spec.key == "privacy.mode" else {}
    cfg = with_overrides(RunConfig(), {alias: value, **extra})
    section, name = spec.key.split(".")
    assert getattr(getattr(cfg, section), name) == value


def test_underscore_and_hyphen_keys_work_everywhere(tmp_path):
    # Flat aliases: the docstring promises underscores work; num_server_rounds used to be refused.
    cfg = with_overrides(RunConfig(), {"num_server_rounds": 7, "lora_rank": 4, "train.local-steps": 3})
    assert (cfg.federation.num_rounds, cfg.lora.rank, cfg.train.local_steps) == (7, 4, 3)
    scenario = tmp_path / "s.toml"
    scenario.write_text("[train]\nlocal-steps = 5\n[federation]\nnum_rounds = 2\n")
    loaded = load_toml(scenario)
    assert (loaded.train.local_steps, loaded.federation.num_rounds) == (5, 2)
    from server.app import config_from_run_config

    assert config_from_run_config({"num_server_rounds": 9}).federation.num_rounds == 9
    from clients.node import node_settings

    conf = {"partition_id": 1, "num_partitions": 2, "lora_rank": 16, "dp_epsilon": 2}
    node = node_settings(RunConfig(), conf)
    assert (node.partition_id, node.rank, node.dp_epsilon) == (1, 16, 2.0)


def test_node_config_keys_come_from_the_fields_and_are_validated():
    from clients.node import NODE_KEYS, node_settings

    assert set(NODE_FIELDS) <= set(NODE_KEYS)
    assert NODE_FIELDS["lora-rank"] == "lora.rank"
    with pytest.raises(ConfigError, match=r"node-config device = 'tpu'.*one of 'auto', 'cpu'"):
        node_settings(RunConfig(), {"device": "tpu"})
    with pytest.raises(ConfigError, match=r"node-config lora-rank = 0.*>= 1"):
        node_settings(RunConfig(), {"lora-rank": 0})
    node = node_settings(RunConfig(), {"data-path": "/data/site.csv"})
    assert (node.data_path, node.data_format) == ("/data/site.csv", "auto")


def test_cli_flags_are_generated_from_the_fields():
    specs = [s for s in field_specs() if s.flag]
    assert {"rounds", "clients", "strategy", "rank", "dp", "out"} <= {s.flag for s in specs}
    parser = argparse.ArgumentParser()
    cli._add_config_flags(parser)
    actions = {a.dest: a for a in parser._actions}
    for s in specs:
        assert actions[s.key].option_strings == [f"--{s.flag}"]
        assert actions[s.key].help == s.help
        assert tuple(actions[s.key].choices or ()) == s.choices
    args = cli.build_parser().parse_args(
        ["simulate", "--rounds", "2", "--data-format", "csv", "--set", "train.weight_decay=0.1"]
    )
    cfg = cli.build_config(args)
    assert (cfg.federation.num_rounds, cfg.data.format, cfg.train.weight_decay) == (2, "csv", 0.1)
