"""fedlora against the plain Flower way (issue 10, section 3): speed, memory, bytes, accuracy, ε.

The plain Flower way is :mod:`experiments.baselines.plain_flower`: the pattern of Flower's own
Opacus/PEFT examples (model rebuilt and a fresh Opacus ``PrivacyEngine`` every round, the whole
adapter state exchanged, ``FedAvg``). Both systems run the same scenario in Flower's simulation
engine on this machine, each in a fresh process, measured the same way from their messages
(:mod:`experiments.baselines.metering`): seconds per round (between the starts of consecutive
rounds; start-up apart), bytes per round, memory (peak of driver + Ray workers, and growth per
client-round), final held-out accuracy. Without and with record-level DP (a fixed noise
multiplier, so both spend the same budget).

ε: the baseline reports what its fresh ``PrivacyEngine`` says after each round -- the ε of that
round alone. The truth is the composition over every round the client trained in, computed here
directly with Opacus' PRV accountant from what each client did (σ, its sample rate, the steps it
reports). fedlora reports its ledger's ε; it must never be below the truth.

Also the bytes of a full-model-state exchange (what Flower's PyTorch examples send), computed from
the ``ArrayRecord`` of the model's whole ``state_dict``.

``--quick`` runs no simulation: it computes the bytes and the ε comparison for the scenario from
the real records and the accountant (seconds).
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from fedlora.config import RunConfig, load_toml, with_overrides
from simulations.runner import DEFAULT_SCENARIO

#: The scenario both systems run (MiniLM default task; tiny, so a run takes under a minute here).
SCENARIO: dict[str, str] = {
    "federation.num_clients": "2",
    "federation.num_rounds": "6",
    "federation.strategy": "fedit",
    "train.local_steps": "5",
    "train.batch_size": "16",
    "data.num_train": "2000",
    "data.num_test": "200",
    "model.max_length": "32",
    # The plain app does no local validation; without a held-out part fedlora does none either,
    # so both do the same work per round (fedlora's validation costs ~0.4 s a client-round here).
    "data.local_val_fraction": "0.0",
}
DP: dict[str, str] = {
    "privacy.mode": "record",
    "privacy.noise_multiplier": "1.0",
    "privacy.max_grad_norm": "1.0",
}
TARGET_SPEEDUP = 1.5


def scenario(dp: bool, out_dir: Path) -> RunConfig:
    """Return the benchmark scenario (with record-level DP if ``dp``), writing its run under ``out_dir``."""
    overrides = {**SCENARIO, **(DP if dp else {}), "output.out_dir": str(out_dir)}
    return with_overrides(load_toml(DEFAULT_SCENARIO), overrides)


def composed_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """Return ε(δ) of ``steps`` Poisson-subsampled Gaussian steps (Opacus PRV, upper end of ±0.01)."""
    from opacus.accountants import PRVAccountant

    acc = PRVAccountant()
    acc.history = [(noise_multiplier, sample_rate, steps)]
    return float(acc.get_epsilon(delta=delta, eps_error=0.01))


def epsilon_check(client_metrics: list[list[dict[str, float]]], cfg: RunConfig, reported_key: str) -> dict:
    """Compare each client's last reported ε with the true composition over its rounds.

    ``client_metrics`` holds, per round, each reply's metrics (``node``, ``dp-sample-rate``, the
    steps under ``steps`` or ``dp-steps``, and the reported ε under ``reported_key``).
    """
    per_node: dict[int, dict[str, Any]] = {}
    for rnd in client_metrics:
        for m in rnd:
            node = per_node.setdefault(int(m["node"]), {"steps": 0, "rounds": 0})
            node["steps"] += int(m.get("dp-steps", m.get("steps", 0)))
            node["rounds"] += 1
            node["q"] = m["dp-sample-rate"]
            node["reported"] = m[reported_key]
    for node in per_node.values():
        node["true"] = composed_epsilon(
            cfg.privacy.noise_multiplier, node["q"], node["steps"], cfg.privacy.delta
        )
    return {
        "clients": {str(k): v for k, v in per_node.items()},
        "reported_max": max(v["reported"] for v in per_node.values()),
        "true_max": max(v["true"] for v in per_node.values()),
        "never_below_truth": all(v["reported"] >= v["true"] - 1e-6 for v in per_node.values()),
    }


def full_model_bytes(cfg: RunConfig) -> dict[str, int]:
    """Bytes of one message carrying the whole model state vs the whole adapter state (computed)."""
    from flwr.app import ArrayRecord

    from experiments.baselines.plain_flower import adapter_arrays, build_model
    from fedlora.protocol_arrays import record_bytes

    model, _ = build_model(cfg)
    base = model.get_base_model()
    full = ArrayRecord({k: v.detach().cpu().contiguous() for k, v in base.state_dict().items()})
    return {"full_model_state": record_bytes(full), "adapter_state": record_bytes(adapter_arrays(model))}


def _planned_epsilons(cfg: RunConfig) -> dict[str, float]:
    """Quick mode: a client with the scenario's data trains every round; per-round vs composed ε."""
    from fedlora.data.cached import partitions
    from fedlora.data.partition import split_local

    n = len(
        split_local(
            partitions(cfg.data, cfg.model.task, cfg.federation.num_clients)[0],
            cfg.data.local_val_fraction,
            cfg.data.seed,
        )[0]
    )
    q = 1.0 / math.ceil(n / cfg.train.batch_size)
    sigma, steps, delta = cfg.privacy.noise_multiplier, cfg.train.local_steps, cfg.privacy.delta
    return {
        "sample_rate": q,
        "per_round_epsilon": composed_epsilon(sigma, q, steps, delta),
        "composed_epsilon": composed_epsilon(sigma, q, steps * cfg.federation.num_rounds, delta),
    }


def _arm(kind: str, dp: bool, work: Path) -> dict[str, Any]:
    from experiments.baselines.metering import run_isolated

    cfg = scenario(dp, work / f"{kind}-{'dp' if dp else 'nodp'}" / "run")
    out = run_isolated(kind, cfg, work / f"{kind}-{'dp' if dp else 'nodp'}", timeout=600)
    if dp:
        key = "dp-epsilon" if kind == "fedlora" else "epsilon"
        out["epsilon"] = epsilon_check(out["client_metrics"], cfg, key)
    return out


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Harness entry (see the module docstring)."""
    from benchmarks.harness import machine, markdown_table

    work = Path(tempfile.mkdtemp(prefix="fedlora-baseline-"))
    cfg = scenario(True, work / "plan")
    sizes = full_model_bytes(cfg)
    k = cfg.federation.clients_per_round or cfg.federation.num_clients
    planned = _planned_epsilons(cfg)
    result: dict[str, Any] = {"scenario": SCENARIO, "dp": DP, "message_bytes": sizes, "planned_dp": planned}
    mib = 2**20
    bytes_rows = [
        [
            "full model state (Flower's PyTorch examples), computed",
            round(2 * k * sizes["full_model_state"] / mib, 2),
        ],
        ["whole adapter state (plain Flower PEFT), computed", round(2 * k * sizes["adapter_state"] / mib, 3)],
    ]
    if quick:
        rows = [*bytes_rows]
        rows.append(["ε one round (what the baseline reports)", round(planned["per_round_epsilon"], 3)])
        rows.append(["ε composed over the run (the truth)", round(planned["composed_epsilon"], 3)])
        return {**result, "quick_only": True, "machine": machine()}, markdown_table(
            ["plain Flower vs fedlora (quick: no simulation)", "value"], rows
        )
    arms = {
        f"{kind}_{'dp' if dp else 'nodp'}": _arm(kind, dp, work)
        for dp in (False, True)
        for kind in ("plain", "fedlora")
    }
    result["arms"] = arms
    rows = []
    for dp in ("nodp", "dp"):
        plain, fed = arms[f"plain_{dp}"], arms[f"fedlora_{dp}"]
        speedup = plain["seconds_per_round_min"] / fed["seconds_per_round_min"]
        cpu_speedup = plain["cpu_seconds_per_round_min"] / fed["cpu_seconds_per_round_min"]
        result[f"speedup_{dp}"] = round(speedup, 2)
        result[f"cpu_speedup_{dp}"] = round(cpu_speedup, 2)
        for name, a in (("plain Flower", plain), ("fedlora", fed)):
            eps = a.get("epsilon")
            rows.append(
                [
                    name,
                    "record DP σ=1" if dp == "dp" else "no DP",
                    a["seconds_per_round_min"],
                    round(speedup, 2) if name == "fedlora" else 1.0,
                    a["cpu_seconds_per_round_min"],
                    round(cpu_speedup, 2) if name == "fedlora" else 1.0,
                    a["startup_seconds"],
                    a["peak_rss_mib"],
                    a["rss_growth_per_client_round_mib"],
                    round(statistics_mean(a["bytes_per_round"]) / mib, 3),
                    round(a["final_accuracy"], 3),
                    f"{eps['reported_max']:.3g} / {eps['true_max']:.3g}" if eps else "-",
                ]
            )
    result["targets"] = {
        "speedup_ge_1.5_nodp": result["speedup_nodp"] >= TARGET_SPEEDUP,
        "speedup_ge_1.5_dp": result["speedup_dp"] >= TARGET_SPEEDUP,
        "cpu_speedup_ge_1.5_nodp": result["cpu_speedup_nodp"] >= TARGET_SPEEDUP,
        "cpu_speedup_ge_1.5_dp": result["cpu_speedup_dp"] >= TARGET_SPEEDUP,
        "fedlora_epsilon_never_below_truth": arms["fedlora_dp"]["epsilon"]["never_below_truth"],
        "plain_epsilon_never_below_truth": arms["plain_dp"]["epsilon"]["never_below_truth"],
    }
    header = [
        "system",
        "privacy",
        "wall s/round (min)",
        "wall speed-up vs plain",
        "CPU s/round (min)",
        "CPU speed-up vs plain",
        "start-up s",
        "peak RSS MiB",
        "RSS growth MiB per client-round",
        "MiB per round (down+up)",
        "final accuracy",
        "ε reported / true (max over clients)",
    ]
    table = (
        markdown_table(header, rows)
        + "\n\n"
        + markdown_table([f"bytes per round, {k} clients", "MiB"], bytes_rows)
    )
    return {**result, "machine": machine()}, table


def statistics_mean(values: list[int]) -> float:
    """Mean of ``values`` (0 for none)."""
    return sum(values) / len(values) if values else 0.0
