"""Ctrl-C on a real ``fedlora simulate``: a real SIGINT to the process group, as a terminal sends it.

The run must end within seconds with exit status 130, keep the last complete round's checkpoint
(which ``--resume``, typed with no other flag, continues to the end), and leave none of the Ray
processes it started.
"""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from fedlora.checkpoint import read_checkpoint
from server.outputs import read_metrics

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
TINY = [
    "--clients", "2", "--rank", "2", "--local-steps", "2", "--batch-size", "8",
    "--set", "data.num_train=40", "--set", "data.num_test=16", "--set", "model.max_length=16",
]  # fmt: skip
# Seconds Ctrl-C may take (measured: 1.3-1.7 s on 2 loaded cores; Flower's own teardown is most of it).
STOP_WITHIN = 15.0


def start(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    """Start ``fedlora simulate`` as its own process group (a terminal's foreground job)."""
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "simulate", *TINY, "--out", str(out), *extra],
        cwd=ROOT,
        env=ENV,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_for(proc: subprocess.Popen, log: Path, text: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"the run ended before {text!r}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout} s"
        time.sleep(0.2)


def ctrl_c(proc: subprocess.Popen) -> tuple[int, float, list[psutil.Process]]:
    """Send SIGINT to the run's process group; return (exit status, seconds to exit, processes it had)."""
    started = psutil.Process(proc.pid).children(recursive=True)
    assert any("raylet" in p.name() or "ray::" in " ".join(p.cmdline()) for p in started), started
    t0 = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    try:
        status = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # only what this test started
        proc.wait()
        pytest.fail("fedlora simulate did not exit within 120 s of Ctrl-C")
    return status, time.monotonic() - t0, started


def leftovers(started: list[psutil.Process], wait: float = 10.0) -> list[str]:
    """Return the processes of ``started`` still alive after ``wait`` seconds (zombies count as gone)."""
    deadline = time.monotonic() + wait
    while True:
        alive = []
        for p in started:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{p.pid} {p.name()}")
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.5)


def kill_leftovers(started: list[psutil.Process]) -> None:
    for p in started:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def test_ctrl_c_mid_run_exits_130_keeps_the_round_and_resume_finishes_it(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(out, log, "--rounds", "6")
    wait_for(proc, log, "round   1/6")  # round 1 is checkpointed right after its line; round 2 trains
    status, seconds, started = ctrl_c(proc)
    alive = leftovers(started)
    kill_leftovers(started)
    text = log.read_text()
    assert status == 130, text[-3000:]
    assert seconds < STOP_WITHIN, f"Ctrl-C took {seconds:.1f} s"
    assert not alive, f"processes the run started are still alive: {alive}"
    assert "Traceback" not in text and "ERROR" not in text, text[-3000:]
    flat = " ".join(text.split())  # the console wraps long lines (a long tmp path)
    last = re.search(r"interrupted; round (\d+) is the last complete one", flat)
    assert last and 1 <= int(last.group(1)) < 6, text[-2000:]  # a fast machine may finish round 2 too
    assert f"fedlora simulate --out {out} --resume" in flat  # how to continue
    ckpt = read_checkpoint(out / "checkpoint.pt")  # the latest file itself is valid (no fallback)
    assert ckpt["round"] == int(last.group(1))
    # The README's resume line, nothing else typed: the run's own configuration (2 clients, 6 rounds,
    # tiny data) continues; with the defaults (4 clients, 5 rounds) it would be refused.
    resumed = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "simulate", "--out", str(out), "--resume"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900, check=False,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out} after round {ckpt['round']}" in resumed.stdout
    rounds = [m["round"] for m in read_metrics(out / "metrics.jsonl") if m["kind"] == "global"]
    assert rounds == [0, 1, 2, 3, 4, 5, 6], rounds
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_ctrl_c_before_the_first_round_ends_exits_130_with_nothing_to_resume(tmp_path):
    out, log = tmp_path / "run", tmp_path / "run.log"
    proc = start(out, log, "--rounds", "2")
    wait_for(proc, log, "round   0/2")  # the initial evaluation is done; round 1 is training
    status, seconds, started = ctrl_c(proc)
    alive = leftovers(started)
    kill_leftovers(started)
    text = log.read_text()
    assert status == 130, text[-3000:]
    assert seconds < STOP_WITHIN, f"Ctrl-C took {seconds:.1f} s"
    assert not alive, f"processes the run started are still alive: {alive}"
    assert "interrupted before the first round completed" in text, text[-2000:]
    assert not (out / "checkpoint.pt").exists()
