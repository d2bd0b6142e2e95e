"""The node's warm worker (``clients/worker.py``) and the secret that guards it, piece by piece.

``tests/deploy/test_node_worker.py`` runs the whole thing (``fedlora node`` with TLS and node
auth); these tests take seconds: app bundles built in memory and loaded twice, the reply
metrics, the private directory and secret, and a real ``flower-supernode`` in process
isolation that hands tasks only to a caller holding the node's secret.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import httpx
import pytest
from flwr.app import MetricRecord, RecordDict

from clients import worker
from fedlora.deploy import node as node_module
from fedlora.deploy.node import FALLBACK_AFTER, NodeRunner, secure_dir, write_secret
from fedlora.deploy.processes import exe, free_port

PYPROJECT = """\
[project]
name = "probe"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "fedloratest"

[tool.flwr.app.components]
serverapp = "probeapp.app:app"
clientapp = "probeapp.app:app"
"""
APP = """\
from flwr.clientapp import ClientApp

VERSION = {version!r}
app = ClientApp()
"""


def _bundle(version: str) -> SimpleNamespace:
    """An app bundle (FAB) whose ``probeapp.app`` says ``VERSION = version``, as Flower hands it over."""
    from flwr.cli.build import build_fab_from_files
    from flwr.supercore.fab import Fab

    files = {
        "pyproject.toml": PYPROJECT.encode(),
        "probeapp/__init__.py": b"",
        "probeapp/app.py": APP.format(version=version).encode(),
    }
    content, _ = build_fab_from_files(files)
    fab = Fab(hashlib.sha256(content).hexdigest(), content, {})
    return SimpleNamespace(run=SimpleNamespace(fab_id="fedloratest/probe", fab_version="1.0.0"), fab=fab)


def test_a_bundle_stays_imported_and_a_new_bundle_replaces_its_code(tmp_path, monkeypatch):
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr"))
    monkeypatch.setattr(sys, "path", list(sys.path))  # load_app inserts the bundle's directory
    old, new = _bundle("one"), _bundle("two")
    cache = worker.AppCache()
    try:
        first = cache.load(old.run, old.fab)
        assert sys.modules["probeapp.app"].VERSION == "one"
        assert cache.load(old.run, old.fab) is first  # same bundle: nothing re-imported
        second = cache.load(new.run, new.fab)
        # the adversary here is stale code: a run that ships new code must not get the old one
        assert second is not first and sys.modules["probeapp.app"].VERSION == "two"
        assert sum(p == str(cache.app_dir) for p in sys.path) == 1
        assert not any(p.endswith(old.fab.hash_str[:8]) for p in sys.path)
    finally:
        worker.drop_modules(sys.modules, {"probeapp"})


def test_drop_modules_removes_whole_packages_only():
    modules = {"clients": 1, "clients.app": 2, "clientsx": 3, "fedlora.models": 4, "torch": 5}
    assert worker.drop_modules(modules, {"clients", "fedlora"}) == [
        "clients",
        "clients.app",
        "fedlora.models",
    ]
    assert modules == {"clientsx": 3, "torch": 5}


def test_bundle_top_names_are_its_packages_and_modules(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "data").mkdir()  # no __init__.py: not a package
    (tmp_path / "tool.py").write_text("")
    (tmp_path / "README.md").write_text("")
    assert worker.bundle_top_names(tmp_path) == {"pkg", "tool"}


def test_phase_seconds():
    assert worker.phase_seconds([("start", 0.0), ("pull", 0.25), ("run", 1.0)]) == "pull 0.250 run 0.750"


def _reply() -> RecordDict:
    return RecordDict({"metrics": MetricRecord({"train-seconds": 0.5})})


def test_round_metrics_in_a_worker_count_from_the_task_and_count_rounds(monkeypatch):
    monkeypatch.setenv(worker.TASK_START_ENV, str(time.time() - 2.0))
    monkeypatch.setenv(worker.ROUNDS_ENV, "4")
    metrics = worker.round_metrics(_reply())["metrics"]
    assert 2.0 <= metrics["clientapp-seconds"] < 60.0
    assert metrics["worker"] == 1 and metrics["worker-rounds"] == 5
    assert os.environ[worker.ROUNDS_ENV] == "5"


def test_round_metrics_outside_a_worker_count_from_the_process_start(monkeypatch):
    import psutil

    monkeypatch.delenv(worker.TASK_START_ENV, raising=False)
    metrics = worker.round_metrics(_reply())["metrics"]
    assert "worker" not in metrics and "worker-rounds" not in metrics
    expected = time.time() - psutil.Process().create_time()
    assert abs(metrics["clientapp-seconds"] - expected) < 5.0


def test_secret_is_fresh_private_and_in_a_private_dir(tmp_path):
    path = write_secret(tmp_path / "worker" / "superexec.secret")
    first = path.read_bytes()
    assert len(first) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert write_secret(path).read_bytes() != first  # a new secret on every start


def test_secure_dir_refuses_an_open_directory_and_a_symlink(tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir(mode=0o755)
    open_dir.chmod(0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        secure_dir(open_dir)
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    with pytest.raises(PermissionError, match="not a plain directory"):
        secure_dir(tmp_path / "link")


def _acquire(address: str, secret: bytes | None):
    from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
    from flwr.supercore.constant import TaskType
    from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor, SuperExecAuthHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
    if secret is not None:
        interceptors.append(
            SuperExecAuthHttpInterceptor(master_secret=secret, protected_methods={worker.ACQUIRE_METHOD})
        )
    client = RuntimeHttpClient.from_server_address(
        server_address=address,
        insecure=True,
        root_certificates=None,
        interceptors=interceptors,
        retry_invoker=worker.retry_invoker(max_tries=1),
    )
    try:
        return client.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
    finally:
        client.close()


@pytest.mark.slow
def test_only_a_holder_of_the_node_secret_can_take_its_tasks(tmp_path):
    """Adversary: another local process (no secret, or a wrong one) polls the node's Runtime API."""
    secret = write_secret(tmp_path / "state" / "worker" / "superexec.secret")
    port = free_port("127.0.0.1")
    cmd = [exe("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{free_port('127.0.0.1')}"]
    cmd += ["--isolation", "process", "--superexec-auth-secret-file", str(secret), "--port", str(port)]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr"), "FLWR_TELEMETRY_ENABLED": "0"}
    node = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # only stops a hung test: ends when the API answers
        while True:
            try:
                res = _acquire(address, secret.read_bytes())
                break
            except Exception:
                if node.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert not res.HasField("task")  # the holder is served (no task waiting)
        for wrong in (None, b"x" * 32):
            with pytest.raises(httpx.HTTPStatusError) as refused:
                _acquire(address, wrong)
            assert refused.value.response.status_code == 401
    finally:
        node.terminate()
        node.wait(30)


def test_a_worker_that_keeps_dying_at_start_is_replaced_by_flowers_superexec(tmp_path):
    """Three fast exits in a row: ``fedlora node`` hands the node to ``flower-superexec``."""
    fallback_ran = tmp_path / "fallback-ran"
    py = sys.executable
    # the stand-in SuperNode runs until the fallback has started, then exits with code 7
    supernode = [
        py,
        "-c",
        f"import os,time\nwhile not os.path.exists({str(fallback_ran)!r}): time.sleep(0.05)\n"
        "raise SystemExit(7)",
    ]
    dying_worker = [py, "-c", "raise SystemExit(3)"]
    fallback = [py, "-c", f"open({str(fallback_ran)!r}, 'w').close()\nimport time; time.sleep(60)"]
    runner = NodeRunner(supernode, dying_worker, fallback, backoff=(0.01, 0.02))
    assert runner.run() == 7
    assert runner.restarts == FALLBACK_AFTER and fallback_ran.exists()
    assert runner.worker is not None and runner.worker.poll() is not None  # stopped with the node


def test_a_worker_that_ran_for_a_while_is_restarted_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(node_module, "FAST_EXIT_S", 0.0)  # every exit counts as after a long run
    starts = tmp_path / "starts"
    py = sys.executable
    supernode = [
        py,
        "-c",
        f"import os,time\nwhile not os.path.exists({str(starts)!r}) or "
        f"len(open({str(starts)!r}).read()) < 5: time.sleep(0.05)\n",
    ]
    worker_cmd = [py, "-c", f"open({str(starts)!r}, 'a').write('w')"]
    fallback = [py, "-c", f"open({str(starts)!r}, 'a').write('F')"]
    runner = NodeRunner(supernode, worker_cmd, fallback, backoff=(0.01, 0.02))
    assert runner.run() == 0
    assert "F" not in starts.read_text() and runner.restarts >= 4


def test_fedlora_node_refuses_flags_it_sets_itself(tmp_path, capsys):
    from fedlora.deploy.node import node_main

    argv = ["--superlink", "127.0.0.1:1", "--state-dir", str(tmp_path / "s"), "--isolation", "subprocess"]
    assert node_main(argv) == 2
    assert "--isolation is set by fedlora node itself" in capsys.readouterr().err
