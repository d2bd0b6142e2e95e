"""One typed, validated run configuration.

A run is described by :class:`RunConfig`, a tree of frozen dataclasses (model, LoRA, data,
training, federation, privacy, output). It is built once from any mix of

* a TOML scenario file whose tables are the sections (``[train]``, ``[lora]`` ...),
* Flower run-config (flat keys such as ``"train.lr"`` or the aliases in :data:`ALIASES`,
  e.g. ``num-server-rounds``),
* command-line flags (dotted overrides, applied last),

and validated on construction: an invalid value raises :class:`ConfigError` naming the
field, the value and what is allowed. Hyphenated keys (Flower style) and underscored keys
(Python style) are accepted everywhere and converted in :func:`_norm_key` only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASKS = ("classification", "causal-lm")
FORMATS = ("auto", "csv", "jsonl", "parquet", "hf-disk")
PARTITIONERS = ("iid", "dirichlet", "shards")
DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
DP_MODES = ("none", "record", "client")
ACCOUNTANTS = ("prv", "rdp")
CLIENT_SAMPLING = ("fixed", "poisson")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed-mean")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, the value and the fix."""


def _fail(field_name: str, value: object, allowed: str) -> None:
    raise ConfigError(f"invalid config value {field_name} = {value!r}: expected {allowed}")


def _check_choice(field_name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(field_name, value, "one of " + ", ".join(repr(c) for c in choices))


def _check_positive(field_name: str, value: float, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        _fail(field_name, value, "a number >= 0" if allow_zero else "a number > 0")


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to adapt and how inputs are tokenised.

    ``name`` is ``"minilm"`` (the packaged all-MiniLM-L6-v2), a local Hugging Face model
    directory, or a hub id (needs network access).
    """

    name: str = "minilm"
    task: str = "classification"
    max_length: int = 32

    def __post_init__(self) -> None:
        _check_choice("model.task", self.task, TASKS)
        if not self.name:
            _fail("model.name", self.name, "'minilm', a local model directory or a hub id")
        if self.max_length < 4:
            _fail("model.max_length", self.max_length, "an integer >= 4")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape. ``alpha = 0`` means ``2 * rank`` (keeps the scale alpha/r = 2 at every rank).

    ``ranks`` gives per-client ranks in simulation (client i gets ``ranks[i % len(ranks)]``);
    empty means every client uses ``rank``. ``target_modules`` empty means detect from the
    architecture.
    """

    rank: int = 8
    alpha: float = 0.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()
    ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            _fail("lora.rank", self.rank, "an integer >= 1")
        for r in self.ranks:
            if r < 1:
                _fail("lora.ranks", list(self.ranks), "a list of integers >= 1, e.g. [4, 8, 16]")
        _check_positive("lora.alpha", self.alpha, allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            _fail("lora.dropout", self.dropout, "a number in [0, 1)")

    def alpha_for(self, rank: int) -> float:
        """Return alpha for a client of rank ``rank`` (constant scale alpha/r when alpha is unset)."""
        if self.alpha > 0:
            return self.alpha
        return 2.0 * rank


@dataclass(frozen=True)
class DataConfig:
    """Where training data comes from and how it is split across clients.

    ``source = "embedded"`` generates the built-in task; otherwise a CSV, JSONL, Parquet file
    or a ``datasets.save_to_disk`` directory. ``test_source`` optionally names a separate
    held-out file; without it ``test_fraction`` of the data is held out by the server.
    """

    source: str = "embedded"
    format: str = "auto"
    test_source: str = ""
    text_column: str = "text"
    label_column: str = "label"
    instruction_column: str = "instruction"
    response_column: str = "response"
    num_train: int = 2000
    num_test: int = 500
    test_fraction: float = 0.2
    partitioner: str = "iid"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    local_val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("data.format", self.format, FORMATS)
        _check_choice("data.partitioner", self.partitioner, PARTITIONERS)
        if not 0.0 < self.test_fraction < 1.0:
            _fail("data.test_fraction", self.test_fraction, "a number in (0, 1)")
        if not 0.0 <= self.local_val_fraction < 1.0:
            _fail("data.local_val_fraction", self.local_val_fraction, "a number in [0, 1)")
        _check_positive("data.dirichlet_alpha", self.dirichlet_alpha)
        if self.shards_per_client < 1:
            _fail("data.shards_per_client", self.shards_per_client, "an integer >= 1")
        if self.num_train < 1 or self.num_test < 1:
            _fail("data.num_train/num_test", (self.num_train, self.num_test), "integers >= 1")


@dataclass(frozen=True)
class TrainConfig:
    """Local training on each client. ``local_steps > 0`` overrides ``local_epochs``."""

    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    local_epochs: float = 1.0
    local_steps: int = 0
    batch_size: int = 16
    max_grad_norm: float = 1.0
    device: str = "auto"
    precision: str = "auto"
    eval_batch_size: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("train.lr", self.lr)
        _check_positive("train.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("train.local_epochs", self.local_epochs)
        _check_positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        if self.warmup_steps < 0 or self.local_steps < 0:
            _fail("train.warmup_steps/local_steps", (self.warmup_steps, self.local_steps), "integers >= 0")
        if self.batch_size < 1 or self.eval_batch_size < 1:
            _fail("train.batch_size", self.batch_size, "an integer >= 1")
        _check_choice("train.device", self.device, DEVICES)
        _check_choice("train.precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, clients and the aggregation strategy.

    ``clients_per_round = 0`` trains every connected client each round. ``min_replies`` is
    the fewest valid updates a round needs to be aggregated; ``round_timeout`` (seconds)
    bounds how long the server waits for replies; ``node_wait_timeout`` bounds how long
    it waits for ``num_clients`` nodes to connect.
    """

    num_clients: int = 4
    num_rounds: int = 5
    clients_per_round: int = 0
    strategy: str = "fedit"
    strategy_params: Mapping[str, Any] = field(default_factory=dict)
    min_replies: int = 1
    round_timeout: float = 900.0
    node_wait_timeout: float = 120.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            _fail("federation.num_clients", self.num_clients, "an integer >= 1")
        if self.num_rounds < 1:
            _fail("federation.num_rounds", self.num_rounds, "an integer >= 1")
        if not 0 <= self.clients_per_round <= self.num_clients:
            _fail("federation.clients_per_round", self.clients_per_round, f"0 (all) to {self.num_clients}")
        if not 1 <= self.min_replies <= self.num_clients:
            _fail("federation.min_replies", self.min_replies, f"1 to num_clients ({self.num_clients})")
        _check_positive("federation.round_timeout", self.round_timeout)
        _check_positive("federation.node_wait_timeout", self.node_wait_timeout)


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy.

    ``mode = "record"``: DP-SGD on every client (Opacus); ``noise_multiplier`` is used as
    given, or calibrated from ``epsilon`` (> 0) over the whole planned run.
    ``mode = "client"``: DP-FedAvg on the server (clip each update to ``clip_norm``, add
    Gaussian noise ``noise_multiplier * clip_norm`` to the sum).
    """

    mode: str = "none"
    epsilon: float = 0.0
    delta: float = 1e-5
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    clip_norm: float = 1.0
    accountant: str = "prv"
    client_sampling: str = "fixed"
    client_sample_rate: float = 1.0

    def __post_init__(self) -> None:
        _check_choice("privacy.mode", self.mode, DP_MODES)
        _check_choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        _check_choice("privacy.client_sampling", self.client_sampling, CLIENT_SAMPLING)
        _check_positive("privacy.epsilon", self.epsilon, allow_zero=True)
        _check_positive("privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        _check_positive("privacy.max_grad_norm", self.max_grad_norm)
        _check_positive("privacy.clip_norm", self.clip_norm)
        if not 0.0 < self.delta < 1.0:
            _fail("privacy.delta", self.delta, "a number in (0, 1), typically below 1/dataset size")
        if not 0.0 < self.client_sample_rate <= 1.0:
            _fail("privacy.client_sample_rate", self.client_sample_rate, "a number in (0, 1]")
        if self.mode != "none" and self.epsilon == 0 and self.noise_multiplier == 0:
            _fail(
                "privacy.epsilon/noise_multiplier",
                0,
                f"a target epsilon or a noise multiplier > 0 for mode {self.mode!r}",
            )


@dataclass(frozen=True)
class OutputConfig:
    """Where results go. Empty ``out_dir`` means ``runs/<timestamp>``."""

    out_dir: str = ""
    resume: bool = False


@dataclass(frozen=True)
class RobustConfig:
    """Defences against hostile or broken nodes (docs/security.md).

    ``norm_bound`` clips each update's ``||ΔW||`` to that multiple of the round's lower
    median (0 = off); updates with a norm above ``max_update_norm`` or a value above
    ``max_abs_value`` are rejected; ``max_weight_factor`` caps a client's example count at
    that multiple of the round's lower median (0 = off); ``aggregator`` replaces FedIT's /
    FFA-LoRA's mean by a coordinate-wise ``median`` or ``trimmed-mean`` (``trim_fraction``
    cut at each end); update records above ``max_update_size`` times their expected size are
    refused before they are read.
    """

    norm_bound: float = 3.0
    max_update_norm: float = 1e4
    max_abs_value: float = 1e4
    max_weight_factor: float = 3.0
    aggregator: str = "mean"
    trim_fraction: float = 0.2
    max_update_size: float = 1.5

    def __post_init__(self) -> None:
        _check_choice("robust.aggregator", self.aggregator, ROBUST_AGGREGATORS)
        for name in ("norm_bound", "max_weight_factor"):
            _check_positive(f"robust.{name}", getattr(self, name), allow_zero=True)
        for name in ("max_update_norm", "max_abs_value"):
            _check_positive(f"robust.{name}", getattr(self, name))
        if not 0.0 <= self.trim_fraction < 0.5:
            _fail("robust.trim_fraction", self.trim_fraction, "a number in [0, 0.5)")
        if self.max_update_size < 1.0:
            _fail("robust.max_update_size", self.max_update_size, "a number >= 1")


@dataclass(frozen=True)
class RunConfig:
    """The whole run configuration (see module docstring)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

    def rank_of(self, partition_id: int) -> int:
        """Return the LoRA rank of simulated client ``partition_id``."""
        ranks = self.lora.ranks or (self.lora.rank,)
        return ranks[partition_id % len(ranks)]

    def max_rank(self) -> int:
        """Return the largest rank any simulated client uses."""
        return max(self.lora.ranks or (self.lora.rank,))

    def to_dict(self) -> dict[str, Any]:
        """Return plain nested dicts (tuples become lists, mappings become dicts)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """Return the configuration as a JSON string (what clients receive)."""
        return json.dumps(dataclasses.asdict(self), default=dict, sort_keys=True)


# Flower run-config keys that are not "section.field".
ALIASES: dict[str, str] = {
    "num-server-rounds": "federation.num_rounds",
    "num-clients": "federation.num_clients",
    "strategy": "federation.strategy",
    "lora-rank": "lora.rank",
    "local-epochs": "train.local_epochs",
    "local-steps": "train.local_steps",
    "lr": "train.lr",
    "batch-size": "train.batch_size",
    "dp-epsilon": "privacy.epsilon",
    "dp-delta": "privacy.delta",
    "dp-mode": "privacy.mode",
    "out-dir": "output.out_dir",
    "resume": "output.resume",
}

_SECTION_TYPES: dict[str, type] = {
    "model": ModelConfig,
    "lora": LoraSettings,
    "data": DataConfig,
    "train": TrainConfig,
    "federation": FederationConfig,
    "privacy": PrivacyConfig,
    "output": OutputConfig,
    "robust": RobustConfig,
}


def _norm_key(key: str) -> str:
    return key.strip().replace("-", "_")


def _coerce_int(field_name: str, value: Any) -> int:
    """Return ``value`` as an int: ints, integral finite floats, and strings of either."""
    if isinstance(value, bool):
        _fail(field_name, value, "an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    try:
        as_float = float(value)
    except (TypeError, ValueError):
        _fail(field_name, value, "an integer")
    if not math.isfinite(as_float):
        _fail(field_name, value, "a finite integer (inf and nan are not integers)")
    if as_float != int(as_float):
        _fail(field_name, value, "an integer")
    return int(as_float)


def _coerce_float(field_name: str, value: Any) -> float:
    """Return ``value`` as a finite float (NaN and +-inf are refused for every float field)."""
    if isinstance(value, bool):
        _fail(field_name, value, "a number")
    try:
        as_float = float(value)
    except (TypeError, ValueError, OverflowError):
        _fail(field_name, value, "a number")
    if not math.isfinite(as_float):
        _fail(field_name, value, "a finite number (nan and inf are not allowed)")
    return as_float


def _coerce(field_name: str, hint: Any, value: Any) -> Any:
    """Convert ``value`` to the field's type, accepting strings from flags and run-config."""
    origin = typing.get_origin(hint)
    if origin in (tuple,):
        inner = typing.get_args(hint)[0]
        if isinstance(value, str):
            value = [v for v in value.replace(" ", ",").split(",") if v]
        if not isinstance(value, list | tuple):
            _fail(field_name, value, f"a list of {inner.__name__}")
        return tuple(_coerce(field_name, inner, v) for v in value)
    if origin in (Mapping, dict) or hint is Mapping:
        if isinstance(value, str):
            try:
                value = json.loads(value) if value.strip() else {}
            except json.JSONDecodeError:
                _fail(field_name, value, 'a table / JSON object, e.g. {"lam": 0.01}')
        if not isinstance(value, Mapping):
            _fail(field_name, value, "a table of parameters")
        return dict(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        _fail(field_name, value, "true or false")
    if hint is int:
        return _coerce_int(field_name, value)
    if hint is float:
        return _coerce_float(field_name, value)
    if hint is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            _fail(field_name, value, "a string")
        return str(value)
    return value


def _build_section(section: str, values: Mapping[str, Any]) -> Any:
    cls = _SECTION_TYPES[section]
    fields = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for raw_key, value in values.items():
        key = _norm_key(raw_key)
        if key not in fields:
            allowed = ", ".join(sorted(fields))
            raise ConfigError(
                f"unknown config key {section}.{raw_key}: allowed keys in [{section}] are {allowed}"
            )
        kwargs[key] = _coerce(f"{section}.{key}", fields[key], value)
    return cls(**kwargs)


def from_mapping(data: Mapping[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig` from nested section tables (the TOML scenario shape)."""
    sections: dict[str, Any] = {}
    for raw_section, values in data.items():
        section = _norm_key(raw_section)
        if section not in _SECTION_TYPES:
            allowed = ", ".join(sorted(_SECTION_TYPES))
            raise ConfigError(f"unknown config section [{raw_section}]: allowed sections are {allowed}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"config section [{raw_section}] must be a table, got {values!r}")
        sections[section] = _build_section(section, values)
    return RunConfig(**sections)


def with_overrides(base: RunConfig, overrides: Mapping[str, Any]) -> RunConfig:
    """Return ``base`` with dotted-key overrides (``"train.lr"``, aliases such as ``num-server-rounds``)."""
    nested = base.to_dict()
    for raw_key, value in overrides.items():
        key = ALIASES.get(raw_key.strip(), raw_key.strip())
        if "." not in key:
            known = ", ".join(sorted(ALIASES))
            raise ConfigError(
                f"unknown config key {raw_key!r}: use 'section.field' (e.g. train.lr) or one of {known}"
            )
        section, name = key.split(".", 1)
        section = _norm_key(section)
        if section not in _SECTION_TYPES:
            raise ConfigError(
                f"unknown config section in key {raw_key!r}: allowed are {', '.join(_SECTION_TYPES)}"
            )
        nested.setdefault(section, {})[_norm_key(name)] = value
    return from_mapping(nested)


def load_toml(path: str | Path) -> RunConfig:
    """Load a scenario file.

    Raises
    ------
    ConfigError
        If the file is missing, is not valid TOML, or holds invalid values.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file {str(p)!r} does not exist; pass an existing scenario, e.g. simulations/default.toml"
        )
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid TOML: {err}") from err
    return from_mapping(data)


def from_json(text: str) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_json`."""
    return from_mapping(json.loads(text))


def to_toml(config: RunConfig) -> str:
    """Render ``config`` as a TOML scenario (what a run directory records)."""
    import tomli_w

    return tomli_w.dumps(config.to_dict())
