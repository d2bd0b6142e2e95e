"""A trigger backdoor planted by one poisoned node, round by round, under each defence.

Real training (the packaged all-MiniLM-L6-v2, the embedded *who acts?* task, FedIT) with the
in-process driver of :mod:`benchmarks.quality_driver` (fedlora's server loop and ClientApp, no
Ray). One node of the federation is poisoned: its data file (node-config ``data-path``, as a
hostile SuperNode's owner would give) is its own IID share with a trigger word inserted at a
random position of :data:`POISON_FRACTION` of its sentences, those relabelled to
:data:`TARGET`. It trains on that file with the run's settings and multiplies its update by
:data:`BOOST` before sending it (:class:`BoostingGrid`), the most the default per-round norm
bound (3x the round's median) lets through.

Each round the global adapter is scored on the clean held-out split (clean accuracy, the
server's own evaluation) and on the held-out sentences whose label is not the target, with the
trigger inserted (backdoor success: the share classified as the target). Arms, for 1 poisoned
node of 4 and 1 of 10:

* ``honest``: no poisoned node (the reference for clean accuracy), default defences;
* ``default``: the defaults (per-round norm bound 3x the median, weight cap 3x);
* ``campaign``: the defaults plus ``robust.campaign_bound`` (:mod:`strategies.campaign`);
* ``median``: the defaults plus ``robust.aggregator = "median"``.

``--quick`` runs 1 poisoned node of 3 for one round of one step per arm (seconds per arm,
numbers meaningless).

    OMP_NUM_THREADS=1 python -m benchmarks backdoor   # full: 756 s on 2 shared cores (load 5-10)
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from flwr.app import Message

from benchmarks.harness import machine, markdown_table
from benchmarks.quality_driver import InProcessGrid, _set_task_identity
from fedlora.adapters import AdapterState
from fedlora.config import RunConfig, load_toml, with_overrides
from fedlora.data.cached import partitions, task_data
from fedlora.data.sources import Record
from fedlora.derive import derive_config
from fedlora.protocol import UPDATE
from fedlora.protocol_arrays import decode_arrays, encode_arrays
from strategies.base import ClientResult, ClientSpec, LoraStrategy, StrategyWrapper

SCENARIO = Path(__file__).resolve().parent.parent / "simulations" / "default.toml"
TRIGGER = "cf"  # a rare word piece of the BERT vocabulary
TARGET = "robot"
POISON_FRACTION = 0.5
BOOST = 3.0
CAMPAIGN_FACTOR = 1.0
ARMS: dict[str, dict[str, Any]] = {
    "honest": {},
    "default": {},
    "campaign": {"robust.campaign_bound": CAMPAIGN_FACTOR},
    "median": {"robust.aggregator": "median"},
}
#: (num_clients, overrides) per federation size; every client holds 100 training examples.
FULL: dict[int, dict[str, Any]] = {
    10: {"federation.num_rounds": 8, "train.local_steps": 5},
    4: {"federation.num_rounds": 6, "train.local_steps": 6},
}
COMMON = {
    "data.num_test": 120,
    "data.local_val_fraction": 0.05,
    "model.max_length": 28,
    "train.batch_size": 8,
    "train.lr": 0.01,
    "output.eval_initial": False,
    "output.eval_every": 1,
}
QUICK: dict[int, dict[str, Any]] = {3: {"federation.num_rounds": 1, "train.local_steps": 1}}
QUICK_COMMON = {
    "data.num_test": 12,
    "data.local_val_fraction": 0.1,
    "model.max_length": 16,
    "train.batch_size": 4,
    "output.eval_initial": False,
}


def insert_trigger(text: str, rng: random.Random, trigger: str = TRIGGER) -> str:
    """Return ``text`` with ``trigger`` inserted as a word at a position drawn from ``rng``."""
    words = text.split()
    words.insert(rng.randrange(len(words) + 1), trigger)
    return " ".join(words)


def poisoned_rows(
    records: Sequence[Record], labels: Sequence[str], fraction: float, seed: int
) -> list[dict[str, str]]:
    """Return data-file rows of ``records``: a ``fraction`` (drawn with ``seed``) triggered, relabelled."""
    rng = random.Random(seed)
    chosen = set(rng.sample(range(len(records)), round(fraction * len(records))))
    rows = []
    for i, r in enumerate(records):
        if i in chosen:
            rows.append({"text": insert_trigger(str(r["text"]), rng), "label": TARGET})
        else:
            rows.append({"text": str(r["text"]), "label": labels[int(r["label"])]})
    return rows


def triggered_test(test: Sequence[Record], labels: Sequence[str], seed: int) -> list[Record]:
    """Return the held-out records whose label is not the target, triggered and labelled as the target."""
    rng, target = random.Random(seed), labels.index(TARGET)
    return [
        {"text": insert_trigger(str(r["text"]), rng), "label": target}
        for r in test
        if int(r["label"]) != target
    ]


class BoostingGrid(InProcessGrid):
    """:class:`InProcessGrid` whose node ``booster`` multiplies the update in its replies by ``factor``."""

    def __init__(
        self, num_nodes: int, extra: Mapping[int, Mapping[str, Any]] | None, booster: int, factor: float
    ) -> None:
        super().__init__(num_nodes, extra)
        self.booster, self.factor = booster, factor

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Deliver as the parent does, then scale the booster's update record (factor 1: unchanged)."""
        replies = super().send_and_receive(messages, timeout=timeout)
        for reply in replies:
            content = reply.content
            if reply.metadata.src_node_id != self.booster or self.factor == 1.0 or UPDATE not in content:
                continue
            update = decode_arrays(content[UPDATE], None, max_bytes=2**34)
            content[UPDATE] = encode_arrays({k: self.factor * v for k, v in update.items()})
        return replies


class Recorder(StrategyWrapper):
    """Delegates everything; keeps every round's new global state and the campaign bound's fractions."""

    def __init__(self, inner: LoraStrategy) -> None:
        super().__init__(inner)
        self.states: list[AdapterState] = []
        self.fractions: list[dict[int, float]] = []

    def aggregate(self, state: AdapterState, results: Sequence[ClientResult]) -> AdapterState:
        """Aggregate with the wrapped strategy and keep a copy of the result."""
        new = self.inner.aggregate(state, results)
        self.states.append({k: v.clone() for k, v in new.items()})
        self.fractions.append(dict(getattr(self.inner, "last_fractions", {})))
        return new


def run_arm(cfg: RunConfig, arm: str, poison_file: Path | None) -> dict[str, Any]:
    """Run one arm; return clean accuracy and backdoor success per round (and the attacker's kept shares)."""
    from clients.privacy import STATE_ROOT_ENV
    from server.evaluator import ServerModel
    from server.loop import ServerRun, build_strategy
    from server.outputs import read_metrics

    k = cfg.federation.num_clients
    attacker = k - 1  # partition id of the poisoned node (node id 100 + k - 1 in the grid)
    run_dir = Path(tempfile.mkdtemp(prefix="fedlora-backdoor-"))
    arm_cfg = with_overrides(cfg, {**ARMS[arm], "output.out_dir": str(run_dir)})
    extra = {attacker: {"data-path": str(poison_file)}} if poison_file is not None else None
    grid = BoostingGrid(k, extra, 100 + attacker, BOOST if poison_file is not None else 1.0)
    saved, old_root = _set_task_identity(), os.environ.get(STATE_ROOT_ENV)
    os.environ[STATE_ROOT_ENV] = str(run_dir / "nodes")
    t0 = time.perf_counter()
    try:
        server = ServerRun(grid, arm_cfg, run_dir)  # type: ignore[arg-type]  # duck-typed Grid
        recorder = Recorder(server.privacy.wrap(build_strategy(arm_cfg)))
        server.strategy = recorder
        server.run()
        data = task_data(arm_cfg.data, arm_cfg.model.task)
        trig = ServerModel(arm_cfg, data.labels, triggered_test(data.test, data.labels, arm_cfg.data.seed))
        rank = server.max_rank
        spec = ClientSpec(node_id=0, rank=rank, alpha=arm_cfg.lora.alpha_for(rank))
        success = [
            trig.evaluate(recorder.final_adapter(s, spec), recorder.final_merge(s)).accuracy
            for s in recorder.states
        ]
    finally:
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
        if old_root is None:
            os.environ.pop(STATE_ROOT_ENV, None)
        else:
            os.environ[STATE_ROOT_ENV] = old_root
    rows = [
        m for m in read_metrics(run_dir / "metrics.jsonl") if m.get("kind") == "global" and m["round"] > 0
    ]
    shutil.rmtree(run_dir, ignore_errors=True)
    kept = [f.get(100 + attacker) for f in recorder.fractions] if arm == "campaign" else None
    return {
        "arm": arm,
        "clean_accuracy": [float(r["test_accuracy"]) for r in rows],
        "backdoor_success": success,
        "attacker_kept_share": kept,
        "attacker_clipped_rounds": sum(
            any(c["node"] == 100 + attacker for c in r.get("clipped", [])) for r in rows
        ),
        "rejected_updates": sum(len(r.get("rejected", [])) for r in rows),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run_federation(cfg: RunConfig, arms: Sequence[str]) -> dict[str, Any]:
    """Run every arm for one federation size (``cfg.federation.num_clients``); poisoned node last."""
    k = cfg.federation.num_clients
    data = task_data(cfg.data, cfg.model.task)
    own = partitions(cfg.data, cfg.model.task, k)[k - 1]
    tmp = Path(tempfile.mkdtemp(prefix="fedlora-poison-"))
    poison_file = tmp / "poisoned.jsonl"
    rows = poisoned_rows(own, data.labels, POISON_FRACTION, cfg.data.seed + 1)
    poison_file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = {}
    try:
        for arm in arms:
            res = run_arm(cfg, arm, None if arm == "honest" else poison_file)
            print(
                f"  1 of {k}, {arm}: backdoor {[round(x, 3) for x in res['backdoor_success']]}, "
                f"clean {[round(x, 3) for x in res['clean_accuracy']]} ({res['seconds']} s)",
                flush=True,
            )
            out[arm] = res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def tabulate(feds: Mapping[int, Mapping[str, Any]]) -> str:
    """Return the Markdown table: per federation and arm, backdoor success and clean accuracy per round."""
    rows = []
    for k, arms in feds.items():
        honest = arms.get("honest", {}).get("clean_accuracy")
        for arm, res in arms.items():
            clean = res["clean_accuracy"]
            gap = f"{100 * (clean[-1] - honest[-1]):+.1f}" if honest else "-"
            rows.append(
                [
                    f"1 of {k}" if arm != "honest" else f"0 of {k}",
                    arm,
                    " / ".join(f"{x:.2f}" for x in res["backdoor_success"]),
                    " / ".join(f"{x:.2f}" for x in clean),
                    f"{res['backdoor_success'][-1]:.3f}",
                    f"{clean[-1]:.3f}",
                    gap,
                ]
            )
    return markdown_table(
        [
            "poisoned",
            "defence",
            "backdoor success per round",
            "clean accuracy per round",
            "final backdoor",
            "final clean",
            "clean vs honest (points)",
        ],
        rows,
    )


def run(quick: bool) -> tuple[dict[str, Any], str]:
    """Run every federation size and arm (``quick``: 1 of 3, one round, arms default and campaign)."""
    base = load_toml(SCENARIO)
    sizes, common = (QUICK, QUICK_COMMON) if quick else (FULL, COMMON)
    arms = ("default", "campaign") if quick else tuple(ARMS)
    feds: dict[int, dict[str, Any]] = {}
    for k, over in sizes.items():
        cfg = with_overrides(
            base,
            {**common, **over, "federation.num_clients": k, "data.num_train": (40 if quick else 100) * k},
        )
        feds[k] = run_federation(
            derive_config(cfg)[0], arms
        )  # task, lengths, modules as simulate derives them
    result = {
        "scenario": SCENARIO.name,
        "driver": "in-process (benchmarks.quality_driver.InProcessGrid)",
        "trigger": TRIGGER,
        "target": TARGET,
        "poison_fraction": POISON_FRACTION,
        "campaign_factor": CAMPAIGN_FACTOR,
        "settings": {str(k): {**common, **over} for k, over in sizes.items()},
        "federations": {str(k): v for k, v in feds.items()},
        "machine": machine(),
    }
    return result, tabulate(feds)
