"""``fedlora node`` for real: a SuperLink, and a SuperNode whose rounds run in its warm worker.

One node (partition 0 of 1), TLS + node authentication, record-level DP, three rounds of
the fedlora app with a tiny configuration. The SuperNode runs in process isolation and the
worker serves rounds 1 and 2 from one process (the base model stays loaded); it is then
SIGKILLed, ``fedlora node`` restarts it, round 3 runs in the new worker and the node's
privacy ledger, kept in its state dir, goes on without a gap and equals what the server
reports. (Should the kill land inside round 3, Flower reports that ClientApp as crashed, the
server rejects the round's update, and the node's ledger may count round 3 once more than
the server's copy: never less.)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psutil
import pytest

from fedlora.deploy.fleet import Fleet, FleetError
from fedlora.privacy.ledger import PrivacyLedger
from fedlora.privacy.runfile import RUN_LEDGER_PATH

pytestmark = pytest.mark.slow

APP_DIR = Path(__file__).resolve().parents[2]
LIMIT = 600  # only stops a hung test; every wait ends on an event
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "OMP_NUM_THREADS": "1",
}
SMALL = (
    "data.num_train=32 data.num_test=16 model.max_length=16 train.local_steps=2 train.batch_size=8 "
    "train.device=cpu lora.rank=4 federation.num_clients=1 federation.node_wait_timeout=300 "
    "privacy.accountant=rdp"
)


def _rows(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # a client's own metrics may sit under "client"; keys in one style (underscores)
    rows = [{**row.pop("client", {}), **row} for row in rows]
    return [{k.replace("-", "_"): v for k, v in row.items()} for row in rows]


def _client_rows(out: Path) -> dict[int, dict]:
    return {r["round"]: r for r in _rows(out) if r["kind"] == "client"}


def _wait_until(condition, what: str, fleet: Fleet) -> None:
    deadline = time.monotonic() + LIMIT
    while not condition():
        if time.monotonic() > deadline:
            raise FleetError(f"timed out waiting for {what}\n{fleet.log_tails()}")
        time.sleep(0.2)


def _workers(node_pid: int) -> list[psutil.Process]:
    """The node's live worker processes (a killed one stays a zombie until the node reaps it)."""
    found = []
    for proc in psutil.Process(node_pid).children(recursive=True):
        try:
            if "clients.worker" in " ".join(proc.cmdline()):
                found.append(proc)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            continue
    return found


@pytest.fixture
def fleet(tmp_path):
    with Fleet(tmp_path / "fleet", extra_env=ENV) as fleet:
        yield fleet


def test_rounds_run_in_the_warm_worker_which_restarts_without_losing_the_ledger(fleet, tmp_path):
    fleet.start_superlink()
    state = tmp_path / "state"
    (node,) = fleet.add_nodes(
        {"edge": {"partition-id": 0, "num-partitions": 1, "state-dir": str(state)}}, worker=True
    )
    fleet.wait_for_nodes(timeout=LIMIT)
    assert "fedlora node: worker started" in node.process.log()
    assert "--isolation process" in node.process.log()  # no flwr-clientapp process per message
    (first,) = _workers(node.process.popen.pid)

    out = tmp_path / "run"
    config = {
        "num-server-rounds": 3,
        "out-dir": str(out),
        "dp-mode": "record",
        "dp-epsilon": 8.0,
        "overrides": SMALL,
    }
    run_id = fleet.submit_run(APP_DIR, config)
    _wait_until(lambda: 2 in _client_rows(out), "round 2", fleet)
    first.kill()  # SIGKILL, as the OOM killer would
    first.wait(LIMIT)
    details = fleet.wait_for_run(run_id, timeout=LIMIT)
    assert details["status"] == "finished:completed", f"{details}\n{fleet.log_tails()}"

    rows = _client_rows(out)
    # rounds 1 and 2 ran in the worker, in one process: the model was loaded once
    assert [(rows[r]["worker"], rows[r]["worker_rounds"]) for r in (1, 2)] == [(1, 1), (1, 2)]
    # under record DP no timing leaves the node (time could tell which records it holds)
    assert not any(k.endswith("_seconds") for r in rows for k in rows[r])
    log = node.process.log()
    assert "fedlora node: worker exited with code -9" in log
    _wait_until(lambda: len(_workers(node.process.popen.pid)) == 1, "the restarted worker", fleet)
    assert _workers(node.process.popen.pid)[0].pid != first.pid

    # the ledger lives in the state dir: nothing was lost with the worker
    mine = PrivacyLedger.load(state / "privacy_ledger.json")
    server = PrivacyLedger.from_dict(json.loads((out / RUN_LEDGER_PATH).read_text())["ledgers"]["client-0"])
    if 3 in rows:  # the kill landed between rounds (the usual case): round 3 ran in the new worker
        assert (rows[3]["worker"], rows[3]["worker_rounds"]) == (1, 1)
        assert mine.rounds == [1, 2, 3] and server == mine
        assert rows[3]["dp_epsilon"] > rows[2]["dp_epsilon"] > rows[1]["dp_epsilon"] > 0
    else:  # it landed inside round 3: that round failed; the node never counts less than the server
        assert sorted(rows) == [1, 2] and server.rounds == [1, 2] and mine.rounds[:2] == [1, 2]
