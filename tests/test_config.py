import pytest

from fedlora.config import ConfigError, RunConfig, from_json, load_toml, to_toml, with_overrides
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
        ("model.task", "translation", "one of 'classification', 'causal-lm'"),
        ("data.partitioner", "random", "'iid', 'dirichlet', 'shards'"),
        ("federation.min_replies", "9", "1 to num_clients"),
        ("lora.dropout", "1.5", "[0, 1)"),
        ("privacy.delta", "2", "(0, 1)"),
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
