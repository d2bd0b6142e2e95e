"""The real fedlora app on a real local deployment: a SuperLink and two SuperNodes, TLS + node auth.

Every test starts its own :class:`fedlora.deploy.fleet.Fleet` (processes on localhost, cleaned up on
exit) and runs ``server/app.py`` / ``clients/app.py`` through ``flwr run``, with a tiny
configuration (64 training examples, 2 local steps, sequence length 16, rank 4) because each
SuperNode starts a fresh ClientApp process, which loads torch and the model, for every message.

* a 2-round run with record-level DP completes and writes every output;
* the SuperLink (with its ServerApp) is killed after round 1 of 3; a new SuperLink on the same
  state database and a ``resume=true`` run finish from the checkpoint, and the clients' privacy
  ledgers continue instead of restarting;
* a SuperNode is killed in round 2: the run completes with the other node and records the
  missing one.

The ServerApp runs with the SuperLink's working directory, so ``out-dir`` is always absolute.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from fedlora.checkpoint import load_checkpoint
from fedlora.deploy.fleet import Fleet, FleetError
from fedlora.deploy.processes import ManagedProcess
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.runfile import RUN_LEDGER_PATH

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[2]
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "OMP_NUM_THREADS": "1",
}
SMALL = (
    "data.num_train=64 data.num_test=32 model.max_length=16 train.local_steps=2 train.batch_size=8 "
    "train.device=cpu lora.rank=4 federation.num_clients=2 federation.node_wait_timeout=120"
)
CLIENTS = ("client-0", "client-1")


def _run_config(out_dir: Path, rounds: int, *, dp=True, resume=False, extra="") -> dict:
    config = {
        "num-server-rounds": rounds,
        "out-dir": str(out_dir),  # absolute: the ServerApp's cwd is the SuperLink's
        "resume": resume,
        "overrides": f"{SMALL} {extra}".strip(),
    }
    if dp:
        config.update({"dp-mode": "record", "dp-epsilon": 8.0})
    return config


def _start(fleet: Fleet, tmp_path: Path) -> dict[str, Path]:
    """Start the SuperLink and two registered SuperNodes (partitions 0 and 1, own state dirs)."""
    fleet.start_superlink()
    state_dirs = {name: tmp_path / f"state-{name}" for name in ("a", "b")}
    fleet.add_nodes(
        {
            name: {
                "partition-id": i,
                "num-partitions": 2,
                "device": "cpu",
                "state-dir": str(state_dirs[name]),
            }
            for i, name in enumerate(state_dirs)
        }
    )
    fleet.wait_for_nodes(timeout=120)
    return state_dirs


def _metrics(out_dir: Path) -> list[dict]:
    path = out_dir / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a client's own metrics may sit under "client"; keys in one style (underscores)
    rows = [{**row.pop("client", {}), **row} for row in rows]
    return [{k.replace("-", "_"): v for k, v in row.items()} for row in rows]


def _global_rounds(out_dir: Path) -> list[int]:
    return [r["round"] for r in _metrics(out_dir) if r["kind"] == "global"]


def _checkpoint_round(out_dir: Path) -> int:
    """Round of the run's checkpoint, -1 if none yet (it is replaced atomically: never half-written)."""
    path = out_dir / "checkpoint.pt"
    return int(load_checkpoint(path)["round"]) if path.exists() else -1


def _lines_up_to(out_dir: Path, last_round: int) -> str:
    """The metrics file's leading lines that belong to rounds up to ``last_round``."""
    kept = []
    for line in (out_dir / "metrics.jsonl").read_text().splitlines(keepends=True):
        if json.loads(line)["round"] > last_round:
            break
        kept.append(line)
    return "".join(kept)


def _wait_until(condition, timeout: float, fleet: Fleet, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise FleetError(f"timed out after {timeout:.0f} s waiting for {what}\n{fleet.log_tails()}")
        time.sleep(0.2)


def _crash(process: ManagedProcess) -> None:
    """SIGKILL a fleet process with all its descendants and process groups, as a power cut would."""
    try:
        family = [psutil.Process(process.popen.pid)]
        family += family[0].children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    groups = {process.popen.pid}
    for proc in family:
        try:
            groups.add(os.getpgid(proc.pid))
        except ProcessLookupError:
            pass
    groups.discard(os.getpgrp())
    for group in groups:
        try:
            os.killpg(group, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in family:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(family, timeout=10)
    process.popen.wait(10)


def _ledger(state_dir: Path) -> PrivacyLedger:
    return PrivacyLedger.load(state_dir / "privacy_ledger.json")


def _run_ledgers(out_dir: Path) -> dict[str, PrivacyLedger]:
    data = json.loads((out_dir / RUN_LEDGER_PATH).read_text())
    return {cid: PrivacyLedger.from_dict(d) for cid, d in data["ledgers"].items()}


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.fixture
def fleet(tmp_path):
    """A fleet whose every process (and descendant) is gone after the test."""
    with Fleet(tmp_path / "fleet", extra_env=ENV) as fleet:
        yield fleet
        started = [proc for managed in fleet.processes for proc in _tree(managed.popen.pid)]
    _, alive = psutil.wait_procs(started, timeout=300)  # returns as soon as all are gone
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], f"left behind: {alive}"


def test_two_nodes_complete_a_record_dp_run(fleet, tmp_path):
    state_dirs = _start(fleet, tmp_path)
    out = tmp_path / "run"
    result = fleet.run_app(APP_DIR, _run_config(out, 2), timeout=600)
    assert result.ok, f"{result.status}\n{result.logs[-4000:]}\n{fleet.log_tails()}"

    rows = _metrics(out)
    assert _global_rounds(out) == [0, 1, 2]
    for rnd in (1, 2):
        clients = [r for r in rows if r["kind"] == "client" and r["round"] == rnd]
        assert sorted(r["partition"] for r in clients) == [0, 1]
        assert all(r["dp_epsilon"] > 0 and r["steps"] == 2 for r in clients)
    last = [r for r in rows if r["kind"] == "global"][-1]
    assert last["clients_ok"] == 2 and last["rejected"] == []
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (out / "adapter" / "adapter_config.json").exists()
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 2

    for ext in ("md", "html"):
        assert "ε" in (out / f"privacy_report.{ext}").read_text()
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["formal_guarantee"] is True
    assert sorted(c["client_id"] for c in report["clients"]) == list(CLIENTS)
    for client in report["clients"]:
        assert client["rounds"] == [1, 2] and client["total_steps"] == 4
        # σ is calibrated with the budget accountant (PRV by default); RDP is a looser bound
        assert client["within_budget"] is True and 0 < client["epsilon_prv"] <= 8.0
    # the nodes' own ledger files agree with what the server reports
    run_ledgers = _run_ledgers(out)
    for cid, name in zip(CLIENTS, ("a", "b"), strict=True):
        assert _ledger(state_dirs[name]) == run_ledgers[cid]


def test_superlink_crash_then_resume_continues_rounds_and_privacy_ledgers(fleet, tmp_path):
    state_dirs = _start(fleet, tmp_path)
    out = tmp_path / "run"
    rdp = "privacy.accountant=rdp"  # calibrating σ with PRV costs seconds per ClientApp process
    run_id = fleet.submit_run(APP_DIR, _run_config(out, 3, extra=rdp))
    # Wait for round 1's checkpoint, not its metrics line: the line comes first.
    _wait_until(lambda: _checkpoint_round(out) >= 1, 600, fleet, f"round 1 of run {run_id}")
    eps_after_1 = next(r for r in _metrics(out) if r["kind"] == "global" and r["round"] == 1)["dp_epsilon"]
    assert sorted(eps_after_1) == list(CLIENTS)

    port = fleet.port
    crashed = fleet.superlink
    _crash(crashed)  # the SuperLink, its SuperExec and the ServerApp, mid round 2 (or later)
    fleet.processes.remove(crashed)
    fleet.superlink = None
    # The kill may land anywhere, also between a round's metrics line and its checkpoint:
    # then one round is logged past the checkpoint, and resuming must drop and redo it.
    done = _checkpoint_round(out)
    assert done >= 1
    assert _global_rounds(out) in (list(range(done + 1)), list(range(done + 2)))
    before = _lines_up_to(out, done)
    # what each node had spent when the server died (round 1, or 1 and 2 if it trained round 2)
    spent = {name: _ledger(state_dirs[name]).entries for name in state_dirs}
    assert all(entries[0].round == 1 for entries in spent.values()), spent

    # A new SuperLink on the same state database and port: the nodes reconnect by themselves.
    fleet.start_superlink(port=port)
    result = fleet.run_app(APP_DIR, _run_config(out, 3, resume=True, extra=rdp), timeout=600)
    assert result.ok, f"{result.status}\n{result.logs[-4000:]}\n{fleet.log_tails()}"
    assert f"resuming {out} after round {done}" in result.logs

    assert _global_rounds(out) == [0, 1, 2, 3]  # no duplicates, nothing lost
    assert (out / "metrics.jsonl").read_text().startswith(before)  # earlier lines untouched
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 3
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    rows = _metrics(out)
    for rnd in range(done + 1, 4):
        assert sorted(r["partition"] for r in rows if r["kind"] == "client" and r["round"] == rnd) == [0, 1]

    run_ledgers = _run_ledgers(out)
    for cid, name in zip(CLIENTS, ("a", "b"), strict=True):
        ledger = run_ledgers[cid]
        # continued: round 1 (from before the crash) is still there, every round has an entry,
        # and a round 2 that a client had trained before the crash is not forgotten (label 4)
        assert ledger.rounds[0] == 1 and set(range(1, 4)) <= set(ledger.rounds), ledger.rounds
        assert ledger.rounds == sorted(set(ledger.rounds))
        assert ledger.epsilon("rdp") > eps_after_1[cid]
        assert ledger.entries[: len(spent[name])] == spent[name]
        assert _ledger(state_dirs[name]) == ledger
    report = json.loads((out / "privacy_report.json").read_text())
    assert {c["client_id"]: c["rounds"] for c in report["clients"]} == {
        c: run_ledgers[c].rounds for c in CLIENTS
    }


def test_run_completes_when_a_node_dies_mid_round(fleet, tmp_path):
    _start(fleet, tmp_path)
    out = tmp_path / "run"
    extra = "federation.min_replies=1 federation.round_timeout=60"
    run_id = fleet.submit_run(APP_DIR, _run_config(out, 2, dp=False, extra=extra))
    _wait_until(lambda: 1 in _global_rounds(out), 600, fleet, f"round 1 of run {run_id}")
    victim = fleet.nodes.pop("b")  # no longer expected to be alive
    victim_id = victim.node_id
    _crash(victim.process)

    details = fleet.wait_for_run(run_id, timeout=600)
    logs = fleet.run_logs(run_id)
    assert details["status"] == "finished:completed", f"{details}\n{logs[-4000:]}\n{fleet.log_tails()}"
    rows = _metrics(out)
    assert _global_rounds(out) == [0, 1, 2]
    round2 = next(r for r in rows if r["kind"] == "global" and r["round"] == 2)
    assert round2["clients_ok"] == 1
    # recorded under its own id (not the SuperLink's, which answers for an unavailable node)
    assert [r["node"] for r in round2["rejected"]] == [victim_id], round2
    reason = round2["rejected"][0]["reason"]
    expected = ("client error: Error: Node Unavailable", "no reply before", "node disconnected")
    assert reason.startswith(expected), reason
    assert [r["partition"] for r in rows if r["kind"] == "client" and r["round"] == 2] == [0]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
