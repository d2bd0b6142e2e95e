"""Real SuperLink + SuperNodes over TLS with node authentication (Flower 1.42 processes).

The Flower App used here is a throwaway probe written to a temp dir: each node adds
``partition-id + 1`` to the global vector, FedAvg (equal weights) averages, so after
``R`` rounds with partitions 0 and 1 every entry is ``1.5 * R``: proof that both
nodes, with their own node config, took part in every round.
"""

import json
import textwrap
from pathlib import Path

import httpx
import psutil
import pytest

from fedlora.deploy import certs
from fedlora.deploy.fleet import Fleet, FleetError
from fedlora.deploy.flwr_cli import write_connection

pytestmark = pytest.mark.slow

# Waits end on events (a node connects, a process exits, a run finishes); LIMIT only stops a
# hung test, so it is far above anything a busy machine needs and never decides a result.
# Refused nodes get max_retries=0 and no --max-wait-time: they give up after one attempt.
LIMIT = 600

PYPROJECT = """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fleetprobe"
version = "1.0.0"
description = "Minimal Flower App that checks a deployment end to end"
license = "Apache-2.0"
dependencies = ["flwr==1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "probe.server_app:app"
clientapp = "probe.client_app:app"

[tool.flwr.app.config]
num-server-rounds = 2
out-file = ""
"""

SERVER_APP = """
import json

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rounds = int(context.run_config["num-server-rounds"])
    strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    initial = ArrayRecord([np.zeros(4, dtype=np.float32)])
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=rounds, timeout=600)
    final = result.arrays.to_numpy_ndarrays()[0]
    with open(str(context.run_config["out-file"]), "w") as handle:
        json.dump({"rounds": rounds, "final": final.tolist()}, handle)
"""

CLIENT_APP = """
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    step = float(context.node_config["partition-id"]) + 1.0
    arrays = [a + step for a in msg.content["arrays"].to_numpy_ndarrays()]
    content = RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord({"num-examples": 1})})
    return Message(content=content, reply_to=msg)
"""


def write_probe_app(app_dir: Path) -> Path:
    (app_dir / "probe").mkdir(parents=True)
    (app_dir / "pyproject.toml").write_text(textwrap.dedent(PYPROJECT))
    (app_dir / "probe" / "__init__.py").write_text("")
    (app_dir / "probe" / "server_app.py").write_text(textwrap.dedent(SERVER_APP))
    (app_dir / "probe" / "client_app.py").write_text(textwrap.dedent(CLIENT_APP))
    return app_dir


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    """One SuperLink (TLS + node auth) with two registered, online SuperNodes."""
    workdir = tmp_path_factory.mktemp("fleet")
    fleet = Fleet(workdir)
    pids: list[int] = []
    try:
        fleet.start_superlink()
        fleet.add_nodes({f"node-{i}": {"partition-id": i, "num-partitions": 2} for i in range(2)})
        fleet.wait_for_nodes(timeout=LIMIT)
        assert [n["status"] for n in fleet.list_nodes()] == ["online", "online"]
        yield fleet
        pids = _all_pids(fleet)
    finally:
        fleet.stop()
    _, alive = psutil.wait_procs([_proc(p) for p in pids if _proc(p)], timeout=LIMIT)
    assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], "fleet left processes behind"


def _proc(pid: int):
    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def _all_pids(fleet: Fleet) -> list[int]:
    pids = []
    for managed in fleet.processes:
        proc = _proc(managed.popen.pid)
        if proc is not None:
            pids += [proc.pid, *(c.pid for c in proc.children(recursive=True))]
    return pids


def test_two_authenticated_nodes_complete_a_run(fleet, tmp_path):
    app = write_probe_app(tmp_path / "app")
    out = tmp_path / "result.json"
    result = fleet.run_app(app, {"num-server-rounds": 2, "out-file": str(out)}, timeout=LIMIT)
    assert result.ok, f"{result.status}\n{result.logs[-3000:]}\n{fleet.log_tails()}"
    assert json.loads(out.read_text()) == {"rounds": 2, "final": [3.0] * 4}
    assert "[ROUND 2/2]" in result.logs
    assert "Received 2 results and 0 failures" in fleet.run_logs(result.run_id)
    # the SuperLink saw exactly the two registered nodes
    registered = {n.node_id for n in fleet.nodes.values() if n.node_id}
    assert {int(n["node-id"]) for n in fleet.list_nodes()} == registered
    # TLS really was on: the SuperLink served HTTPS and the nodes dialled with our CA
    assert "Uvicorn running on https://" in fleet.superlink.log()


def test_unregistered_node_is_refused(fleet):
    before = {n["node-id"] for n in fleet.list_nodes()}
    rogue = fleet.add_node("rogue", {"partition-id": 0}, register=False, max_retries=0)
    code = rogue.process.wait(timeout=LIMIT)
    assert code != 0
    assert "Failed to activate SuperNode" in rogue.process.log()
    assert {n["node-id"] for n in fleet.list_nodes()} == before


def test_plain_http_client_is_refused(fleet):
    # a SuperNode speaking plain HTTP (it would self-register if the server let it)
    plain = fleet.add_node("plain", {"partition-id": 0}, insecure=True, max_retries=0)
    assert plain.process.wait(timeout=LIMIT) != 0
    assert "Failed to initialize the connection to the SuperLink" in plain.process.log()
    # a raw plain-HTTP request gets no HTTP response at all
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{fleet.address}/", timeout=5)
    # an operator CLI connection without TLS cannot reach the Control API either
    write_connection(fleet.cli_home, "plain", fleet.address, insecure=True, make_default=False)
    with pytest.raises(FleetError):
        fleet.flwr_json("ls", "plain", "--format", "json", timeout=60)
    assert len(fleet.list_nodes()) == 2


def test_server_certificate_from_another_ca_is_refused(fleet, tmp_path):
    other = certs.init_pki(tmp_path / "other-ca")
    stranger = fleet.add_node("wrong-ca", {"partition-id": 0}, root_certificates=other.ca_cert, max_retries=0)
    assert stranger.process.wait(timeout=LIMIT) != 0
    assert "CERTIFICATE_VERIFY_FAILED" in stranger.process.log()
