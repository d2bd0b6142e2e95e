"""The README's ``flwr run .`` line on a fresh machine: Flower's own local simulation, nothing set up.

A private ``FLWR_HOME`` (no Flower configuration yet, as on a fresh machine) and private ports
for the local SuperLink that ``flwr run`` starts; ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``
as the README advises (else Flower installs the app's dependencies, ~5 GB, for every run). The
line is read from the README and run as written, with size-reducing run-config appended; it is
followed as the README says (``flwr ls``, ``flwr log``). A run that cannot work fails at once and
says why in ``flwr ls``.
"""

import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FLWR = str(Path(sys.executable).with_name("flwr"))
# Appended to the README's line: one small round (the README's is 5 rounds of the default scenario).
SMALL = (
    "num-server-rounds=1 overrides='data.num_train=40 data.num_test=16 train.local_steps=2 "
    "model.max_length=16 lora.rank=2'"
)


def readme_flwr_run_line() -> str:
    """Return the README's ``flwr run .`` command (a line of a bash block)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    lines = [
        line.split("  #")[0].strip()
        for block in re.findall(r"```bash\n(.*?)```", text, re.S)
        for line in block.splitlines()
        if line.startswith("flwr run .")
    ]
    assert len(lines) == 1, lines
    return lines[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flower(tmp_path_factory):
    """Environment of a fresh machine's ``flwr`` with private home and ports; stops what it started."""
    home = tmp_path_factory.mktemp("flwr-home")
    port, control = _free_port(), _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    yield env
    # The local SuperLink outlives `flwr run` (Flower has no command to stop it): stop the one this
    # module started, found by its private port, with everything below it.
    mine = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if f"127.0.0.1:{port}" in cmd or f"127.0.0.1:{control}" in cmd:
            mine.append(proc)
    for proc in list(mine):
        try:
            mine += proc.children(recursive=True)
        except psutil.NoSuchProcess:
            pass
    for proc in mine:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(mine, timeout=30)


def flwr(env: dict, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [FLWR, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def submit(env: dict, argv: list[str]) -> int:
    """Run a ``flwr run`` command line (``--format json``); return the run id it printed."""
    assert argv[:2] == ["flwr", "run"], argv
    proc = flwr(env, *argv[1:], "--format", "json")
    assert proc.returncode == 0, (proc.stdout, proc.stderr)
    res = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert res["success"], res
    return int(res["run-id"])


def status(env: dict, run_id: int, timeout: float = 900) -> dict:
    """Poll ``flwr ls --run-id`` until the run finished; return its row."""
    deadline = time.monotonic() + timeout
    while True:
        proc = flwr(env, "ls", "--run-id", str(run_id), "--format", "json")
        if proc.returncode == 0:
            row = json.loads(proc.stdout[proc.stdout.index("{") :])["runs"][0]
            if row["status"].startswith("finished"):
                return row
        assert time.monotonic() < deadline, f"run {run_id} did not finish within {timeout} s"
        time.sleep(3)


def test_readme_flwr_run_line_completes_on_a_fresh_machine(flower, tmp_path):
    out = tmp_path / "run"
    argv = [*shlex.split(readme_flwr_run_line()), "--run-config", f"{SMALL} out-dir='{out}'"]
    run_id = submit(flower, argv)
    row = status(flower, run_id)
    log = flwr(flower, "log", str(run_id), "--show").stdout
    assert row["status"] == "finished:completed", (row, log[-4000:])
    # Flower's local simulation has 2 SuperNodes; the default scenario's 4 clients became 2.
    assert "this simulation has 2 SuperNodes: the run has 2 clients" in log
    assert "round   1/1" in log and f"results in {out}" in log
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


def test_a_run_that_cannot_work_fails_at_once_and_says_why(flower):
    run_id = submit(flower, ["flwr", "run", ".", "--run-config", "num-clients=4"])
    t0 = time.monotonic()
    row = status(flower, run_id, timeout=300)
    assert row["status"] == "finished:failed", row
    assert "num-clients = 4, but this simulation has 2 SuperNodes" in row["status-details"]
    assert "--num-supernodes 4" in row["status-details"]  # how to resize it
    assert time.monotonic() - t0 < 120, "the run should fail at once, not after the node wait timeout"
