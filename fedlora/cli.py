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

from fedlora.config import ConfigError, RunConfig, field_specs, load_toml, with_overrides

# Exit status of every subcommand (argparse itself exits with 2 on a bad command line).
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

# ``fedlora simulate --help`` groups, one per config section, in this order.
_GROUP_TITLES = {
    "federation": "federation",
    "model": "model",
    "lora": "LoRA",
    "data": "data",
    "train": "training",
    "privacy": "privacy",
    "output": "output",
}
_METAVARS = {int: "N", float: "X", str: "VALUE"}
_SPECS = {spec.key: spec for spec in field_specs()}

EPILOG = """\
Every config field is reachable with --set section.field=value (hyphens and underscores
are interchangeable); the flags above are shortcuts declared beside the fields in
fedlora/config.py. Exit status: 0 done, 1 the run failed, 2 invalid command or
configuration (an unknown strategy or model is refused before anything starts),
130 interrupted."""


def _metavar(hint: Any) -> str:
    return _METAVARS.get(hint, "LIST")


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """Add one option per config field that declares a ``flag`` (help and choices from config)."""
    groups = {s: p.add_argument_group(t) for s, t in _GROUP_TITLES.items()}
    for spec in field_specs():
        if spec.flag is None:
            continue
        group = groups[spec.section]
        if spec.hint is bool:
            group.add_argument(
                f"--{spec.flag}", dest=spec.key, action="store_true", default=None, help=spec.help
            )
            continue
        kind = spec.hint if spec.hint in _METAVARS else str
        group.add_argument(
            f"--{spec.flag}",
            dest=spec.key,
            type=kind,
            choices=spec.choices or None,
            metavar=None if spec.choices else (spec.metavar or _metavar(spec.hint)),
            help=spec.help,
        )


def _simulate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "simulate",
        help="run a federated LoRA fine-tuning with virtual clients on this machine",
        description="Run many virtual clients and the server on this machine (Flower Simulation\n"
        "Engine). Without arguments: 4 clients x 5 rounds of FedIT on the packaged\n"
        "all-MiniLM-L6-v2 and the embedded task (simulations/default.toml).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", metavar="PATH", help="scenario TOML file (default: simulations/default.toml)")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any config field, e.g. --set train.weight_decay=0.01 (repeatable)",
    )
    p.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="-v: fedlora's debug log; -vv: also Flower's and Ray's logs",
    )
    _add_config_flags(p)
    g = p.add_argument_group("resources")
    g.add_argument(
        "--cpus-per-client", type=float, default=0.0, metavar="X", help="CPUs per virtual client (0 = all)"
    )
    g.add_argument(
        "--gpus-per-client", type=float, default=0.0, help="GPU share per virtual client (0 = auto)"
    )
    g.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="join an existing Ray cluster (e.g. 10.0.0.5:6379, or 'auto') instead of starting one",
    )


def build_config(args: argparse.Namespace) -> RunConfig:
    """Return the run config from ``--config`` plus flag overrides (flags win, ``--set`` last).

    With ``--resume`` and no ``--config`` the base is the run's own configuration (read from
    its directory, :func:`server.resume.run_config_of`), not the default scenario: flags given
    on top are changes, which the resume checks against the checkpoint.
    """
    from server.resume import run_config_of
    from simulations.runner import DEFAULT_SCENARIO

    overrides = _flag_overrides(args)
    output = with_overrides(RunConfig(), _output_overrides(overrides)).output
    if output.resume and not args.config:
        if not output.out_dir:
            raise ConfigError(
                "--resume continues the run in --out DIR: give its directory, e.g. --out runs/wd"
            )
        own = run_config_of(output.out_dir)
        if own is not None:
            return with_overrides(own, overrides)
    return with_overrides(load_toml(args.config or DEFAULT_SCENARIO), overrides)


def _output_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """Return the overrides of the ``[output]`` section (whatever the other sections' values)."""
    aliases = {spec.alias for spec in _SPECS.values() if spec.section == "output" and spec.alias}
    return {k: v for k, v in overrides.items() if k.replace("-", "_").startswith("output.") or k in aliases}


def _flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Return the config overrides the command line gives (declared flags, then ``--set``)."""
    overrides: dict[str, Any] = {}
    for spec in field_specs():
        value = getattr(args, spec.key, None)
        if spec.flag is not None and value is not None:
            overrides[spec.key] = value
    for item in args.set:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=0.001")
        key, value = item.split("=", 1)
        overrides[key] = value
    return overrides


def cmd_simulate(args: argparse.Namespace) -> int:
    """Run ``fedlora simulate``."""
    from simulations.runner import simulate

    simulate(
        build_config(args),
        args.cpus_per_client,
        args.gpus_per_client,
        verbosity=args.verbose,
        ray_address=args.ray_address,
    )
    return 0


def _evaluate_parser(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate",
        help="score a saved adapter on a data set",
        description="Load the base model plus a PEFT adapter directory and report loss and accuracy.",
    )
    p.add_argument("adapter_dir", help="PEFT adapter directory (e.g. runs/<id>/adapter)")
    p.add_argument(
        "--data",
        default="embedded",
        metavar="PATH",
        help="'embedded' or 'instruct' (the run's generated held-out split) or a data file",
    )
    for flag, key in (
        ("--data-format", "data.format"),
        ("--text-column", "data.text_column"),
        ("--label-column", "data.label_column"),
        ("--instruction-column", "data.instruction_column"),
        ("--response-column", "data.response_column"),
    ):
        spec = _SPECS[key]
        p.add_argument(
            flag, default=spec.default, choices=spec.choices or None, metavar=spec.metavar, help=spec.help
        )
    p.add_argument(
        "--device",
        default=_SPECS["train.device"].default,
        choices=_SPECS["train.device"].choices,
        help="device to evaluate on (auto: a GPU when there is one)",
    )
    p.add_argument("--model", metavar="NAME", help="base model (default: from the adapter's run config)")
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
        instruction_column=args.instruction_column,
        response_column=args.response_column,
        model=args.model,
        device=args.device,
    )
    if args.json:
        print(json.dumps(res))
    else:
        print(f"{res['examples']} examples: accuracy {res['accuracy']:.4f}, loss {res['loss']:.4f}")
        if "exact_match" in res:  # causal LM
            print(
                f"response perplexity {res['perplexity']:.3f}, exact-match {res['exact_match']:.3f} "
                f"({res['generated']} greedy answers)"
            )
            for row in res["samples"]:
                print(f"  {row['instruction']!r} -> {row['answer']!r} (reference {row['reference']!r})")
    return 0


def _report_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report",
        help="render a run's privacy report (Markdown, HTML, JSON)",
        description="Write privacy_report.md, .html and .json of a run directory again from the privacy "
        "ledgers the run recorded (privacy/), e.g. after a resumed or copied run or a fedlora upgrade. "
        "A run without DP gets a report that says so plainly.",
    )
    p.add_argument("run_dir", help="run directory (runs/<timestamp>, or the --out of the run)")


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``fedlora report``."""
    from fedlora.privacy.report import write_report

    run_dir = Path(args.run_dir)
    if not any((run_dir / name).exists() for name in ("metrics.jsonl", "config.toml", "privacy")):
        raise FileNotFoundError(
            f"{str(run_dir)!r} is not a run directory (no metrics.jsonl, config.toml or privacy/); "
            "pass the directory a run wrote, e.g. runs/<timestamp>"
        )
    paths = write_report(run_dir)
    for p in paths.values() if isinstance(paths, dict) else paths:
        print(p)
    return 0


def cmd_certs(argv: list[str]) -> int:
    """Run ``fedlora certs`` (TLS and node-authentication material)."""
    from fedlora.deploy.cli import certs_main

    return certs_main(argv)


def _quiet_libraries() -> None:
    """Hide library notices a user cannot act on (bitsandbytes' CPU-kernel notice, FutureWarnings)."""
    import logging
    import warnings

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning)


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fedlora`` argument parser (``certs`` and ``node`` parse their own options)."""
    parser = argparse.ArgumentParser(prog="fedlora", description="Federated LoRA fine-tuning on Flower.")
    sub = parser.add_subparsers(dest="command", required=True)
    _simulate_parser(sub)
    _evaluate_parser(sub)
    _report_parser(sub)
    sub.add_parser(
        "certs", help="create a CA, SuperLink certificate and SuperNode keys (fedlora certs --help)"
    )
    sub.add_parser("node", help="run a SuperNode with a warm worker process (fedlora node --help)")
    sub.add_parser(
        "audit-dp", help="empirical ε lower bound of DP-SGD from one run (fedlora audit-dp --help)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedlora`` console script (``argv`` None: the process's command line)."""
    argv_given = argv
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["certs"]:
        return cmd_certs(argv[1:])
    if argv[:1] == ["audit-dp"]:
        from fedlora.audit import main as audit_main

        return audit_main(argv[1:])
    if argv[:1] == ["node"]:
        from fedlora.deploy.node import node_main

        return node_main(argv[1:])
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    handlers = {"simulate": cmd_simulate, "evaluate": cmd_evaluate, "report": cmd_report}
    try:
        return handlers[args.command](args)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        print(f"fedlora {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as err:
        print(f"fedlora {args.command}: failed: {err}", file=sys.stderr, flush=True)
        return _abnormal_end(EXIT_FAILED, process=argv_given is None)
    except KeyboardInterrupt as stop:
        from simulations.interrupt import Interrupted

        advice = stop.advice() if isinstance(stop, Interrupted) else "interrupted"
        print(f"fedlora {args.command}: {advice}", file=sys.stderr, flush=True)
        return _abnormal_end(EXIT_INTERRUPTED, process=argv_given is None)


def _abnormal_end(status: int, *, process: bool) -> int:
    """Return ``status``; as the process's own command (``process``), end the process promptly.

    A failed or interrupted simulation may leave library threads behind that would keep the
    process alive (:func:`simulations.interrupt.exit_promptly`); a caller of ``main(argv)``
    gets the status back instead.
    """
    if process:
        from simulations.interrupt import exit_promptly

        exit_promptly(status)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
