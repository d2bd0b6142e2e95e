"""The ``fedlora`` command: simulate, evaluate, report, certs.

Flags override the scenario file (``--config``), which overrides built-in defaults; the
generic ``--set section.key=value`` reaches every config field.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedlora.config import ConfigError, RunConfig, load_toml, with_overrides

# CLI flag -> dotted config key (None: handled specially).
FLAG_KEYS: dict[str, str] = {
    "clients": "federation.num_clients",
    "rounds": "federation.num_rounds",
    "clients_per_round": "federation.clients_per_round",
    "strategy": "federation.strategy",
    "model": "model.name",
    "task": "model.task",
    "data": "data.source",
    "data_format": "data.format",
    "test_data": "data.test_source",
    "text_column": "data.text_column",
    "label_column": "data.label_column",
    "partitioner": "data.partitioner",
    "dirichlet_alpha": "data.dirichlet_alpha",
    "rank": "lora.rank",
    "ranks": "lora.ranks",
    "alpha": "lora.alpha",
    "lr": "train.lr",
    "batch_size": "train.batch_size",
    "local_steps": "train.local_steps",
    "local_epochs": "train.local_epochs",
    "device": "train.device",
    "dp": "privacy.mode",
    "dp_epsilon": "privacy.epsilon",
    "dp_delta": "privacy.delta",
    "dp_noise": "privacy.noise_multiplier",
    "dp_clip": "privacy.max_grad_norm",
    "client_sampling": "privacy.client_sampling",
    "client_sample_rate": "privacy.client_sample_rate",
    "out": "output.out_dir",
}


def _simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated LoRA fine-tuning with virtual clients on this machine",
        description="Run many virtual clients and the server on this machine (Flower Simulation Engine). "
        "Without arguments: 4 clients x 5 rounds of FedIT on the packaged all-MiniLM-L6-v2 "
        "and the embedded task.",
    )
    p.add_argument("--config", help="scenario TOML file (default: simulations/default.toml)")
    g = p.add_argument_group("federation")
    g.add_argument("--clients", type=int, help="number of virtual clients")
    g.add_argument("--rounds", type=int, help="number of federated rounds")
    g.add_argument("--clients-per-round", type=int, help="clients sampled per round (0 = all)")
    g.add_argument("--strategy", help="aggregation: fedit, ffa, fair, hetlora, flexlora, flora")
    g = p.add_argument_group("model and LoRA")
    g.add_argument("--model", help="'minilm' (packaged), a local Hugging Face model dir, or a hub id")
    g.add_argument("--task", choices=["classification", "causal-lm"], help="fine-tuning task")
    g.add_argument("--rank", type=int, help="LoRA rank of every client")
    g.add_argument("--ranks", help="per-client ranks, cycled over clients, e.g. 4,8,16")
    g.add_argument("--alpha", type=float, help="LoRA alpha (default 2 x rank)")
    g = p.add_argument_group("data")
    g.add_argument("--data", help="'embedded', or a CSV/JSONL/Parquet file or saved HF dataset dir")
    g.add_argument("--data-format", help="csv, jsonl, parquet, hf-disk (default: from suffix)")
    g.add_argument("--test-data", help="separate held-out file (default: hold out data.test_fraction)")
    g.add_argument("--text-column", help="text column for classification")
    g.add_argument("--label-column", help="label column for classification")
    g.add_argument(
        "--partitioner", choices=["iid", "dirichlet", "shards"], help="how data is split across clients"
    )
    g.add_argument(
        "--dirichlet-alpha", type=float, help="Dirichlet concentration (smaller = more label skew)"
    )
    g = p.add_argument_group("training")
    g.add_argument("--lr", type=float, help="AdamW learning rate")
    g.add_argument("--batch-size", type=int, help="local batch size")
    g.add_argument("--local-steps", type=int, help="optimiser steps per round (overrides epochs)")
    g.add_argument("--local-epochs", type=float, help="local epochs per round")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="training device")
    g = p.add_argument_group("privacy")
    g.add_argument(
        "--dp", choices=["none", "record", "client"], help="DP mode: record (DP-SGD) or client (DP-FedAvg)"
    )
    g.add_argument("--dp-epsilon", type=float, help="target epsilon for the whole run (calibrates the noise)")
    g.add_argument("--dp-delta", type=float, help="delta (default 1e-5)")
    g.add_argument("--dp-noise", type=float, help="noise multiplier (instead of a target epsilon)")
    g.add_argument("--dp-clip", type=float, help="per-sample clipping norm C for DP-SGD")
    g.add_argument(
        "--client-sampling", choices=["fixed", "poisson"], help="client sampling (client-level DP)"
    )
    g.add_argument("--client-sample-rate", type=float, help="Poisson client sampling probability")
    g = p.add_argument_group("output")
    g.add_argument("--out", help="run directory (default runs/<timestamp>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. --set train.weight_decay=0.01 (repeatable)",
    )
    g = p.add_argument_group("resources")
    g.add_argument("--cpus-per-client", type=float, default=0.0, help="CPUs per virtual client (0 = all)")
    g.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="GPU share per virtual client (0 = auto)"
    )


def build_config(args: argparse.Namespace) -> RunConfig:
    """Return the run config from ``--config`` plus flag overrides."""
    from simulations.runner import DEFAULT_SCENARIO

    base = load_toml(args.config or DEFAULT_SCENARIO)
    overrides: dict[str, Any] = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is not None:
            overrides[key] = value
    if args.resume:
        overrides["output.resume"] = True
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.001")
        key, value = item.split("=", 1)
        overrides[key] = value
    return with_overrides(base, overrides)


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedlora simulate``."""
    from simulations.runner import simulate

    simulate(build_config(args), args.cpus_per_client, args.gpus_per_client)
    return 0


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a saved adapter on a data set",
        description="Load the base model plus a PEFT adapter directory and report loss and accuracy.",
    )
    p.add_argument("adapter_dir", help="PEFT adapter directory (e.g. runs/<id>/adapter)")
    p.add_argument("--data", default="embedded", help="'embedded' (its held-out split) or a data file")
    p.add_argument("--data-format", default="auto", help="csv, jsonl, parquet, hf-disk")
    p.add_argument("--text-column", default="text")
    p.add_argument("--label-column", default="label")
    p.add_argument("--model", help="base model (default: from the adapter's run config)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run ``fedlora evaluate``."""
    from fedlora.evaluate import evaluate_adapter

    res = evaluate_adapter(
        Path(args.adapter_dir),
        data=args.data,
        data_format=args.data_format,
        text_column=args.text_column,
        label_column=args.label_column,
        model=args.model,
        device=args.device,
    )
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['examples']} examples: accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}")
    return 0


def _report_parser(sub: Any) -> None:
    p = sub.add_parser("report", help="render a run's privacy report (Markdown, HTML, JSON)")
    p.add_argument("run_dir", help="run directory")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``fedlora report``."""
    from fedlora.privacy.report import write_report

    paths = write_report(Path(args.run_dir))
    for p in paths if isinstance(paths, list | tuple) else [paths]:
        print(p)
    return 0


def cmd_certs(argv: list[str]) -> int:
    """Run ``fedlora certs`` (TLS and node-authentication material)."""
    from fedlora.deploy.cli import certs_main

    return certs_main(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        return cmd_certs(argv[1:])
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _evaluate_parser(sub)
    _report_parser(sub)
    sub.add_parser(
        "certs", help="create a CA, SuperLink certificate and SuperNode keys (fedlora certs --help)"
    )
    args = parser.parse_args(argv)
    handlers = {"simulate": cmd_simulate, "evaluate": cmd_evaluate, "report": cmd_report}
    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        print(f"fedlora {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
