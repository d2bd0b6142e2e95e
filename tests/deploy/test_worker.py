"""The node-local worker: its socket, who may open it, surviving failures, and equal results.

The worker is served from a thread of the test process (the same ``serve`` loop that
``python -m fedlora.deploy.worker`` runs); ``tests/deploy/test_node_worker.py`` runs it as
the real process that ``fedlora node`` starts.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from clients import worker as client_worker
from fedlora.config import RunConfig, with_overrides
from fedlora.deploy.worker import (
    SOCKET_ENV,
    WorkerError,
    WorkerUnavailable,
    call,
    secure_dir,
    serve,
    socket_path_for,
)
from fedlora.models import adapter_state, get_lora_model, init_adapter_state

LABELS = ["person", "animal", "vehicle", "robot"]


class Served:
    """A worker loop in a thread, stopped and joined on exit."""

    def __init__(self, path: Path, handler) -> None:
        self.path, self.stop, self.ready = path, threading.Event(), threading.Event()
        args = (path, handler, self.stop, self.ready)
        self.thread = threading.Thread(target=serve, args=args, daemon=True)

    def __enter__(self) -> Served:
        self.thread.start()
        while not self.ready.wait(0.05):  # ends when the thread listens or dies, not on a clock
            if not self.thread.is_alive():
                raise RuntimeError("the worker thread died before listening")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


def _echo(frames: list[bytes]) -> list[bytes]:
    if frames[0] == b"fail":
        raise ValueError("bad round")
    return [b"got:" + b"|".join(frames)]


@pytest.fixture
def sock(tmp_path) -> Path:
    return socket_path_for(tmp_path / "state")


def test_round_trip_and_a_failed_request_leaves_the_worker_serving(sock):
    with Served(sock, _echo):
        assert call(sock, [b"a", b"", b"c" * 100_000]) == [b"got:a||" + b"c" * 100_000]
        with pytest.raises(WorkerError, match="ValueError: bad round"):
            call(sock, [b"fail"])
        assert call(sock, [b"again"]) == [b"got:again"]
    assert not sock.exists()  # removed on shutdown


def test_no_worker_is_unavailable_not_an_error(sock):
    with pytest.raises(WorkerUnavailable):
        call(sock, [b"x"])


def test_socket_dir_is_private_and_a_stale_socket_is_replaced(sock):
    secure_dir(sock.parent)
    assert (sock.parent.stat().st_mode & 0o777) == 0o700
    sock.write_text("left by a killed worker")
    with Served(sock, _echo):
        assert (sock.stat().st_mode & 0o777) == 0o600
        assert call(sock, [b"x"]) == [b"got:x"]
    os.chmod(sock.parent, 0o755)
    with pytest.raises(PermissionError, match="chmod 700"):
        secure_dir(sock.parent)


def test_long_state_dirs_get_a_short_private_socket_path(tmp_path):
    deep = tmp_path / ("d" * 120)
    path = socket_path_for(deep)
    assert len(str(path)) <= 100 and path == socket_path_for(deep)  # stable across restarts


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another local user")
def test_another_local_user_cannot_use_the_worker():
    """Attack: a different uid on the node connects to the worker to run or read rounds."""
    probe = (  # stdlib only, imported before dropping to uid 65534 ("nobody")
        "import os, socket, struct, sys\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n    conn.connect(sys.argv[1])\nexcept OSError as err:\n    sys.exit(f'REFUSED {err}')\n"
        "try:\n    conn.sendall(struct.pack('!IQ', 1, 5) + b'steal')\n    reply = conn.recv(64)\n"
        "except OSError:\n    reply = b''\n"
        "sys.exit('ANSWERED' if reply else 'REFUSED: closed without a reply')\n"
    )

    def as_nobody() -> str:
        run = subprocess.run(
            [sys.executable, "-c", probe, str(base / "worker" / "worker.sock")],
            capture_output=True,
            text=True,
        )
        return run.stderr.strip()

    base = Path(tempfile.mkdtemp(prefix="fedlora-test-"))  # pytest's tmp dirs are 0700: not reachable
    try:
        os.chmod(base, 0o711)
        sock = base / "worker" / "worker.sock"
        _attack(sock, as_nobody)
    finally:
        shutil.rmtree(base)


def _attack(sock: Path, as_nobody) -> None:
    with Served(sock, _echo):
        assert as_nobody().startswith("REFUSED [Errno 13]")  # the 0700 directory stops it
        # even with the directory and socket opened up, the peer-uid check refuses it
        os.chmod(sock.parent, 0o755)
        os.chmod(sock, 0o777)
        assert as_nobody() == "REFUSED: closed without a reply"
        assert call(sock, [b"mine"]) == [b"got:mine"]


# ---------------------------------------------------------------------- a real round


def _cfg(**over) -> RunConfig:
    base = {
        "data.num_train": 48,
        "data.num_test": 16,
        "model.max_length": 16,
        "train.local_steps": 2,
        "train.batch_size": 8,
        "train.device": "cpu",
        "federation.num_clients": 2,
        "lora.rank": 4,
    }
    return with_overrides(RunConfig(), {**base, **over})


def _content(cfg: RunConfig, rank: int = 4) -> RecordDict:
    loaded = get_lora_model("minilm", "classification", len(LABELS), 4, 8.0)
    start = init_adapter_state(adapter_state(loaded, 4), 0)
    conf = {"run-config": cfg.to_json(), "labels": json.dumps(LABELS), "round": 1, "rank": rank}
    conf.update({"alpha": 2.0 * rank, "seed": 0, "train-a": True})
    adapter = ArrayRecord({k: v.detach().clone() for k, v in start.items()})
    return RecordDict({"adapter": adapter, "config": ConfigRecord(conf)})


def _context(**node) -> Context:
    node_config = {"partition-id": 0, "num-partitions": 2, **node}
    return Context(run_id=1, node_id=10, node_config=node_config, state=RecordDict(), run_config={})


def _update(reply: RecordDict) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.numpy()) for k, v in reply.array_records["update"].items()}


def test_delegated_round_equals_the_in_process_round_and_keeps_state(sock, monkeypatch, tmp_path):
    from clients.round import run_train_round

    cfg = _cfg()
    first, second = _content(cfg), _content(cfg)  # (loading the model draws random numbers)
    torch.manual_seed(0)  # dropout draws from the global generator (the served thread shares it)
    here = run_train_round(first, _context())
    monkeypatch.setenv(SOCKET_ENV, str(sock))
    with Served(sock, client_worker.handle):
        torch.manual_seed(0)
        there = client_worker.delegate(client_worker.KIND_TRAIN, second, _context())
        again = client_worker.delegate(client_worker.KIND_TRAIN, _content(cfg), _context())
        # a round that fails in the worker fails the ClientApp the same way; the worker goes on
        with pytest.raises(WorkerError, match="rank"):
            client_worker.delegate(client_worker.KIND_TRAIN, _content(cfg, rank=8), _context())
        # record-level DP: the ledger written in the worker comes back in context.state
        context = _context(**{"state-dir": str(tmp_path / "state")})
        dp = _cfg(**{"privacy.mode": "record", "privacy.noise_multiplier": 1.0})
        private = client_worker.delegate(client_worker.KIND_TRAIN, _content(dp), context)
    assert there is not None and again is not None and private is not None
    assert _update(there).keys() == _update(here).keys()
    for key, value in _update(here).items():
        assert torch.equal(_update(there)[key], value), key
    assert there["metrics"]["worker"] == 1 and "worker" not in here["metrics"]
    assert [there["metrics"]["worker-rounds"], again["metrics"]["worker-rounds"]] == [1, 2]  # one process
    assert private["metrics"]["worker-rounds"] == 3  # the failed round was not counted
    assert "fedlora-privacy" in context.state.config_records
    assert (tmp_path / "state" / "privacy_ledger.json").is_file()


def test_without_a_worker_the_clientapp_trains_in_process(sock, monkeypatch):
    monkeypatch.setenv(SOCKET_ENV, str(sock))  # configured, but nobody listens
    assert client_worker.delegate(client_worker.KIND_TRAIN, _content(_cfg()), _context()) is None
    reply = client_worker.run_round(_content(_cfg()), _context())  # what the ClientApp calls
    assert "worker" not in reply["metrics"] and "update" in reply.array_records
    assert reply["metrics"]["clientapp-seconds"] > reply["metrics"]["train-seconds"]
    monkeypatch.delenv(SOCKET_ENV)
    assert client_worker.delegate(client_worker.KIND_TRAIN, _content(_cfg()), _context()) is None
