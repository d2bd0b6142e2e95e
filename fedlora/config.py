"""One typed, validated run configuration.

A run is described by :class:`RunConfig`, a tree of frozen dataclasses (model, LoRA, data,
training, federation, privacy, output). It is built once from any mix of

* a TOML scenario file whose tables are the sections (``[train]``, ``[lora]`` ...),
* Flower run-config (flat keys such as ``"train.lr"`` or the aliases in :data:`ALIASES`,
  e.g. ``num-server-rounds``),
* command-line flags (dotted overrides, applied last),

and validated on construction: an invalid value raises :class:`ConfigError` naming the
field, the value and what is allowed.

Each field declares its whole surface once, in its dataclass (:func:`_field` metadata): the
help text, the ``fedlora simulate`` flag, the flat run-config alias, the SuperNode
node-config key and the allowed choices. The CLI (:mod:`fedlora.cli`), :data:`ALIASES` and
:data:`NODE_FIELDS` (read by ``clients/node.py``) are generated from :func:`field_specs`.

Hyphens and underscores are interchangeable in every key: TOML fields, dotted overrides
(``train.local-steps``) and flat aliases (``num_server_rounds``); :func:`_norm_key` and
:func:`_alias_key` are the only places that convert them.
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
QUANTIZATIONS = ("none", "4bit", "8bit")
DP_MODES = ("none", "record", "client")
ACCOUNTANTS = ("prv", "rdp")
CLIENT_SAMPLING = ("fixed", "poisson")
ROBUST_AGGREGATORS = ("mean", "median", "trimmed-mean")
REPORT_TO = ("tensorboard", "mlflow", "wandb")


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


def _field(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    flag: str | None = None,
    alias: str | None = None,
    node: str | None = None,
    choices: tuple[str, ...] = (),
    metavar: str | None = None,
    default_factory: Any = dataclasses.MISSING,
) -> Any:
    """Declare a config field with its whole surface (see :class:`FieldSpec`), once.

    ``flag`` is the ``fedlora simulate`` option (without ``--``), ``alias`` the flat Flower
    run-config key, ``node`` the SuperNode ``--node-config`` key that overrides it per node.
    """
    meta = {"help": help, "flag": flag, "alias": alias, "node": node, "choices": choices, "metavar": metavar}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to adapt and how inputs are tokenised.

    ``name`` is ``"minilm"`` (the packaged all-MiniLM-L6-v2), a local Hugging Face model
    directory, or a hub id (needs network access).
    """

    name: str = _field(
        "minilm",
        flag="model",
        metavar="NAME",
        help="'minilm' (packaged), 'smollm2' (optional package), a local Hugging Face model dir, "
        "a .gguf file, or a hub id",
    )
    task: str = _field(
        "auto",
        flag="task",
        choices=("auto", *TASKS),
        help="fine-tuning task (auto: from the data's columns, fedlora/derive.py)",
    )
    max_length: int = _field(
        0, help="tokens per example, longer inputs are cut (0: from the data, capped by the model's context)"
    )
    quantization: str = _field(
        "none",
        choices=QUANTIZATIONS,
        help="load the frozen base in 4 or 8 bit (QLoRA, bitsandbytes, CUDA only)",
    )

    def __post_init__(self) -> None:
        _check_choice("model.task", self.task, ("auto", *TASKS))
        if not self.name:
            _fail("model.name", self.name, "'minilm', a local model directory or a hub id")
        if self.max_length != 0 and self.max_length < 4:
            _fail("model.max_length", self.max_length, "0 (from the data) or an integer >= 4")
        _check_choice("model.quantization", self.quantization, QUANTIZATIONS)


@dataclass(frozen=True)
class LoraSettings:
    """LoRA shape. ``alpha = 0`` means ``2 * rank`` (keeps the scale alpha/r = 2 at every rank).

    ``ranks`` gives per-client ranks in simulation (client i gets ``ranks[i % len(ranks)]``);
    empty means every client uses ``rank``. ``target_modules`` empty means detect from the
    architecture.
    """

    rank: int = _field(8, flag="rank", alias="lora-rank", node="lora-rank", help="LoRA rank of every client")
    alpha: float = _field(0.0, flag="alpha", help="LoRA alpha (0 = 2 x rank)")
    dropout: float = _field(0.0, help="LoRA dropout probability")
    target_modules: tuple[str, ...] = _field((), help="modules to adapt, e.g. query,value (empty = detect)")
    ranks: tuple[int, ...] = _field(
        (), flag="ranks", help="per-client ranks, cycled over clients, e.g. 4,8,16 (empty = rank)"
    )

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

    source: str = _field(
        "embedded",
        flag="data",
        metavar="PATH",
        node="data-path",
        help="'embedded', or a CSV/JSONL/Parquet file or saved HF dataset dir",
    )
    format: str = _field(
        "auto",
        flag="data-format",
        node="data-format",
        choices=FORMATS,
        help="data file format (auto: from suffix)",
    )
    test_source: str = _field(
        "",
        flag="test-data",
        metavar="PATH",
        help="separate held-out file (default: hold out data.test_fraction)",
    )
    text_column: str = _field(
        "text", flag="text-column", metavar="COLUMN", help="text column (classification)"
    )
    label_column: str = _field(
        "label", flag="label-column", metavar="COLUMN", help="label column (classification)"
    )
    instruction_column: str = _field(
        "instruction", flag="instruction-column", metavar="COLUMN", help="instruction column (causal-lm)"
    )
    response_column: str = _field(
        "response", flag="response-column", metavar="COLUMN", help="response column (causal-lm)"
    )
    num_train: int = _field(2000, help="training examples of the embedded task")
    num_test: int = _field(500, help="held-out examples of the embedded task")
    test_fraction: float = _field(0.2, help="share of a data file held out by the server")
    partitioner: str = _field(
        "iid", flag="partitioner", choices=PARTITIONERS, help="how data is split across clients"
    )
    dirichlet_alpha: float = _field(
        0.5, flag="dirichlet-alpha", help="Dirichlet concentration (smaller = more label skew)"
    )
    shards_per_client: int = _field(2, help="label-sorted shards per client (shards partitioner)")
    local_val_fraction: float = _field(0.1, help="share of each client's data kept for local validation")
    seed: int = _field(0, help="seed of data generation, partitioning and local splits")

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

    lr: float = _field(3e-3, flag="lr", alias="lr", help="AdamW learning rate")
    weight_decay: float = _field(0.0, help="AdamW weight decay")
    warmup_steps: int = _field(0, help="linear learning-rate warm-up steps")
    local_epochs: float = _field(
        1.0, flag="local-epochs", alias="local-epochs", help="local epochs per round"
    )
    local_steps: int = _field(
        0, flag="local-steps", alias="local-steps", help="optimiser steps per round (> 0 overrides epochs)"
    )
    batch_size: int = _field(16, flag="batch-size", alias="batch-size", help="local batch size")
    max_grad_norm: float = _field(1.0, help="gradient clipping without DP (0 = off)")
    device: str = _field("auto", flag="device", node="device", choices=DEVICES, help="training device")
    precision: str = _field("auto", choices=PRECISIONS, help="training precision")
    eval_batch_size: int = _field(64, help="batch size of evaluation")
    seed: int = _field(0, help="seed of local training (batch order, dropout)")
    gradient_checkpointing: bool = _field(
        False, help="recompute activations in backward (less memory, ~30% more compute)"
    )
    grad_accum_steps: int = _field(
        1, help="split each batch into this many micro-batches (same update, less memory)"
    )

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
        if not 1 <= self.grad_accum_steps <= self.batch_size:
            _fail("train.grad_accum_steps", self.grad_accum_steps, f"1 to batch_size ({self.batch_size})")


@dataclass(frozen=True)
class FederationConfig:
    """Rounds, clients and the aggregation strategy.

    ``clients_per_round = 0`` trains every connected client each round. ``min_replies`` is
    the fewest valid updates a round needs to be aggregated; ``round_timeout`` (seconds)
    bounds how long the server waits for replies; ``node_wait_timeout`` bounds how long
    it waits for ``num_clients`` nodes to connect.
    """

    num_clients: int = _field(4, flag="clients", alias="num-clients", help="number of clients (nodes)")
    num_rounds: int = _field(5, flag="rounds", alias="num-server-rounds", help="number of federated rounds")
    clients_per_round: int = _field(0, flag="clients-per-round", help="clients sampled per round (0 = all)")
    strategy: str = _field(
        "fedit",
        flag="strategy",
        metavar="NAME",
        alias="strategy",
        help="aggregation strategy (see docs/strategies.md)",
    )
    strategy_params: Mapping[str, Any] = _field(
        default_factory=dict, help='strategy keyword arguments, e.g. {"lam": 0.01}'
    )
    min_replies: int = _field(1, help="fewest valid updates a round needs to be aggregated")
    round_timeout: float = _field(
        0.0,
        help="seconds the server waits for a round's replies (0: no limit until a round completes, "
        "then 10x the slowest completed round, at least 5 minutes)",
    )
    node_wait_timeout: float = _field(120.0, help="seconds the server waits for num_clients nodes")
    seed: int = _field(0, help="seed of the initial adapter and client sampling")

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            _fail("federation.num_clients", self.num_clients, "an integer >= 1")
        if self.num_rounds < 1:
            _fail("federation.num_rounds", self.num_rounds, "an integer >= 1")
        if not 0 <= self.clients_per_round <= self.num_clients:
            _fail("federation.clients_per_round", self.clients_per_round, f"0 (all) to {self.num_clients}")
        if not 1 <= self.min_replies <= self.num_clients:
            _fail("federation.min_replies", self.min_replies, f"1 to num_clients ({self.num_clients})")
        _check_positive("federation.round_timeout", self.round_timeout, allow_zero=True)
        _check_positive("federation.node_wait_timeout", self.node_wait_timeout)


MAX_DELTA = 1e-3
"""The largest δ any run accepts: a δ near 1/n lets a mechanism publish a whole record."""


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy.

    ``mode = "record"``: DP-SGD on every client (Opacus); ``noise_multiplier`` is used as
    given, or calibrated from ``epsilon`` (> 0) over the whole planned run.
    ``mode = "client"``: DP-FedAvg on the server (clip each update to ``clip_norm``, add
    Gaussian noise ``noise_multiplier * clip_norm`` to the sum).
    """

    mode: str = _field(
        "none",
        flag="dp",
        alias="dp-mode",
        choices=DP_MODES,
        help="DP mode: record (DP-SGD on clients) or client (DP-FedAvg on the server)",
    )
    epsilon: float = _field(
        0.0,
        flag="dp-epsilon",
        alias="dp-epsilon",
        node="dp-epsilon",
        help="target epsilon for the whole run (calibrates the noise)",
    )
    delta: float = _field(1e-5, flag="dp-delta", alias="dp-delta", help="DP delta")
    noise_multiplier: float = _field(
        0.0, flag="dp-noise", help="noise multiplier (instead of a target epsilon)"
    )
    max_grad_norm: float = _field(1.0, flag="dp-clip", help="per-example clipping norm C of DP-SGD")
    clip_norm: float = _field(1.0, help="update clipping norm of client-level DP")
    accountant: str = _field("prv", choices=ACCOUNTANTS, help="privacy accountant")
    client_sampling: str = _field(
        "fixed", flag="client-sampling", choices=CLIENT_SAMPLING, help="client sampling (client-level DP)"
    )
    client_sample_rate: float = _field(
        1.0, flag="client-sample-rate", help="Poisson client sampling probability"
    )

    def __post_init__(self) -> None:
        _check_choice("privacy.mode", self.mode, DP_MODES)
        _check_choice("privacy.accountant", self.accountant, ACCOUNTANTS)
        _check_choice("privacy.client_sampling", self.client_sampling, CLIENT_SAMPLING)
        _check_positive("privacy.epsilon", self.epsilon, allow_zero=True)
        _check_positive("privacy.noise_multiplier", self.noise_multiplier, allow_zero=True)
        _check_positive("privacy.max_grad_norm", self.max_grad_norm)
        _check_positive("privacy.clip_norm", self.clip_norm)
        if not 0.0 < self.delta <= MAX_DELTA:
            _fail("privacy.delta", self.delta, "a number in (0, 1e-3], typically below 1/dataset size")
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
    """Where results go and how often the server evaluates. Empty ``out_dir`` means ``runs/<timestamp>``.

    The server scores the global adapter on the held-out split after every ``eval_every``-th
    round and after the last one; ``eval_initial`` also scores the untrained adapter (round 0).
    """

    out_dir: str = _field(
        "", flag="out", metavar="DIR", alias="out-dir", help="run directory (default runs/<timestamp>)"
    )
    resume: bool = _field(
        False, flag="resume", alias="resume", help="continue the run in out_dir from its last checkpoint"
    )
    eval_initial: bool = _field(True, help="evaluate the untrained initial adapter as round 0")
    eval_every: int = _field(
        1, flag="eval-every", metavar="K", help="server evaluation every K rounds (the last always)"
    )
    report_to: tuple[str, ...] = _field(
        (),
        flag="report-to",
        metavar="NAMES",
        help="also report metrics to tensorboard, mlflow and/or wandb, e.g. tensorboard,mlflow "
        "(fedlora/tracking.py)",
    )

    def __post_init__(self) -> None:
        for name in self.report_to:
            _check_choice("output.report_to", name, REPORT_TO)
        if self.eval_every < 1:
            _fail("output.eval_every", self.eval_every, "an integer >= 1 (1 = evaluate every round)")


@dataclass(frozen=True)
class RobustConfig:
    """Defences against hostile or broken nodes (docs/security.md).

    ``norm_bound`` clips each update's ``||ΔW||`` to that multiple of the round's lower
    median (0 = off); updates with a norm above ``max_update_norm`` or a value above
    ``max_abs_value`` are rejected; ``max_weight_factor`` caps a client's example count at
    that multiple of the round's lower median (0 = off); ``aggregator`` replaces FedIT's /
    FFA-LoRA's mean by a coordinate-wise ``median`` or ``trimmed-mean`` (``trim_fraction``
    cut at each end); update records above ``max_update_size`` times their expected size are
    refused before they are read; ``campaign_bound`` caps each node's deviation from the
    round's median update, summed over the run, at that multiple of the median node's
    (``strategies/campaign.py``; 0 = off).
    """

    norm_bound: float = _field(3.0, help="clip updates to this multiple of the round's median norm (0 = off)")
    max_update_norm: float = _field(1e4, help="reject updates whose ||dW|| exceeds this")
    max_abs_value: float = _field(1e4, help="reject updates holding a value larger than this in magnitude")
    max_weight_factor: float = _field(
        3.0, help="cap example counts at this multiple of the round's median (0 = off)"
    )
    aggregator: str = _field("mean", choices=ROBUST_AGGREGATORS, help="robust centre (fedit, ffa)")
    trim_fraction: float = _field(0.2, help="share cut at each end by the trimmed mean")
    max_update_size: float = _field(1.5, help="refuse update records above this multiple of their size")
    campaign_bound: float = _field(
        0.0, help="cap each node's summed deviation over rounds at this multiple of the median's (0 = off)"
    )

    def __post_init__(self) -> None:
        _check_choice("robust.aggregator", self.aggregator, ROBUST_AGGREGATORS)
        if self.campaign_bound != 0.0 and not self.campaign_bound >= 1.0:
            _fail("robust.campaign_bound", self.campaign_bound, "0 (off) or a number >= 1")
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
        """Return the largest rank this config assigns to simulated clients.

        A planning value only: node-config ``lora-rank`` can change a node's rank, so the
        server's global rank is the largest rank its clients report (``server/loop.py``).
        """
        return max(self.lora.ranks or (self.lora.rank,))

    def to_dict(self) -> dict[str, Any]:
        """Return plain nested dicts (tuples become lists, mappings become dicts)."""
        return json.loads(self.to_json())

    def to_json(self) -> str:
        """Return the configuration as a JSON string (what clients receive)."""
        return json.dumps(dataclasses.asdict(self), default=dict, sort_keys=True)


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


@dataclass(frozen=True)
class FieldSpec:
    """One config field and every name it is reachable by (declared once, in its dataclass).

    Parameters
    ----------
    key
        Dotted name, e.g. ``"train.lr"`` (TOML table and field).
    hint
        The field's type annotation.
    default
        The built-in default.
    help
        One line for ``--help`` and the docs.
    flag
        ``fedlora simulate`` option without ``--`` (``None``: reachable through ``--set``).
    alias
        Flat Flower run-config key (``None``: use the dotted key).
    node
        SuperNode ``--node-config`` key that overrides the field on one node.
    choices
        The allowed values of a string field (empty: free).
    metavar
        Placeholder of the flag's value in ``--help`` (``None``: from the type).
    """

    key: str
    hint: Any
    default: Any
    help: str
    flag: str | None
    alias: str | None
    node: str | None
    choices: tuple[str, ...]
    metavar: str | None = None

    @property
    def section(self) -> str:
        """The TOML table the field lives in."""
        return self.key.split(".", 1)[0]


def field_specs() -> tuple[FieldSpec, ...]:
    """Return every config field in declaration order (sections as in :class:`RunConfig`)."""
    specs = []
    for section, cls in _SECTION_TYPES.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
            m = f.metadata
            specs.append(
                FieldSpec(
                    key=f"{section}.{f.name}",
                    hint=hints[f.name],
                    default=default,
                    help=m.get("help", ""),
                    flag=m.get("flag"),
                    alias=m.get("alias"),
                    node=m.get("node"),
                    choices=tuple(m.get("choices", ())),
                    metavar=m.get("metavar"),
                )
            )
    return tuple(specs)


# Flat Flower run-config keys (``num-server-rounds``) -> dotted field, from the field declarations.
ALIASES: dict[str, str] = {s.alias: s.key for s in field_specs() if s.alias}

# SuperNode ``--node-config`` keys -> dotted field, from the field declarations.
NODE_FIELDS: dict[str, str] = {s.node: s.key for s in field_specs() if s.node}


def _norm_key(key: str) -> str:
    return key.strip().replace("-", "_")


def _alias_key(key: str) -> str:
    """Return the hyphenated spelling of a flat key (``num_server_rounds`` -> ``num-server-rounds``)."""
    return key.strip().replace("_", "-")


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
        key = ALIASES.get(_alias_key(raw_key), raw_key.strip())
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
