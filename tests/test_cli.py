"""The ``fedlora`` command as a user runs it: real invocations of the console script, small inputs."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from fedlora.adapters import is_lora_b
from fedlora.cli import main
from fedlora.config import field_specs
from fedlora.export import save_peft_adapter
from fedlora.models import adapter_state, get_lora_model, init_adapter_state

FEDLORA = [sys.executable, "-m", "fedlora.cli"]
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


def fedlora(*args: str, timeout: float = 120, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FEDLORA, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout, check=False
    )


def test_simulate_help_lists_every_declared_flag_and_the_exit_codes():
    proc = fedlora("simulate", "--help")
    assert proc.returncode == 0, proc.stderr
    for spec in field_specs():
        if spec.flag:
            assert f"--{spec.flag}" in proc.stdout, spec.flag
    assert "{none,record,client}" in proc.stdout  # choices come from fedlora/config.py
    assert "--ray-address" in proc.stdout and "-v, --verbose" in proc.stdout
    assert "Exit status: 0 done, 1 the run failed, 2 invalid" in proc.stdout


def test_an_unknown_strategy_is_refused_by_the_console_script_before_anything_starts(tmp_path):
    out = tmp_path / "run"
    proc = fedlora("simulate", "--out", str(out), "--strategy", "fedsgd")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "unknown strategy 'fedsgd'; available: fair, fedit, ffa" in proc.stderr
    assert "Traceback" not in proc.stderr and "kernels" not in proc.stderr
    assert not out.exists() and proc.stdout == ""  # no run directory, no data summary, no Ray


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "no/such-model-dir"], "model 'no/such-model-dir' is neither 'minilm'"),
        (["--set", 'federation.strategy_params={"lam": 1}'], "strategy 'fedit' has no parameter 'lam'"),
        (["--set", "train.lr=-1"], "train.lr = -1.0"),
        (["--set", "bogus=1"], "unknown config key 'bogus'"),
        (["--config", "missing.toml"], "does not exist"),
    ],
)
def test_invalid_runs_are_refused_with_exit_2_before_anything_starts(tmp_path, capsys, args, needle):
    out = tmp_path / "run"
    assert main(["simulate", "--out", str(out), *args]) == 2
    captured = capsys.readouterr()
    assert needle in captured.err
    assert not out.exists() and captured.out == ""


def test_bad_command_lines_exit_2(capsys):
    assert fedlora("frobnicate").returncode == 2
    for argv in (["simulate", "--partitioner", "random"], ["simulate", "--rounds", "many"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
    assert "invalid choice: 'random'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    loaded = get_lora_model("minilm", "classification", 4, 2, 4.0, 0.0, ("query", "value"))
    gen = torch.Generator().manual_seed(0)
    state = {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if is_lora_b(k) else v
        for k, v in init_adapter_state(adapter_state(loaded, 2), 1).items()
    }
    from fedlora.data.embedded import EMBEDDED_LABELS

    meta = {"labels": list(EMBEDDED_LABELS), "model": "minilm", "task": "classification", "max_length": 16}
    return save_peft_adapter(
        tmp_path_factory.mktemp("cli") / "adapter",
        state,
        base_model="minilm",
        task="classification",
        alpha=4.0,
        target_modules=loaded.target_modules,
        head_modules=loaded.head_modules,
        meta=meta,
    )


def test_evaluate_scores_an_adapter_on_a_csv(adapter_dir, tmp_path, capsys):
    data = tmp_path / "test.csv"
    data.write_text("review,stars\nthe cat chases the robot,animal\nthe robot lifts the car,robot\n")
    columns = ["--text-column", "review", "--label-column", "stars"]
    assert main(["evaluate", str(adapter_dir), "--data", str(data), *columns, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["examples"] == 2 and 0.0 <= res["accuracy"] <= 1.0 and res["loss"] > 0
    assert main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "adapter directory" in capsys.readouterr().err


def test_report_renders_a_run_directory_and_refuses_other_directories(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    assert main(["report", str(run)]) == 0
    assert {Path(p).name for p in capsys.readouterr().out.split()} == {
        "privacy_report.json",
        "privacy_report.md",
        "privacy_report.html",
    }
    assert json.loads((run / "privacy_report.json").read_text())["formal_guarantee"] is False
    assert main(["report", str(tmp_path / "elsewhere")]) == 2
    assert "is not a run directory" in capsys.readouterr().err


def test_certs_init_writes_a_ca_and_server_certificate(tmp_path):
    assert main(["certs", "init", "--out", str(tmp_path / "pki")]) == 0
    names = {p.name for p in (tmp_path / "pki").rglob("*") if p.is_file()}
    assert any(n.startswith("ca") for n in names) and any("server" in n for n in names), names


# --- fedlora simulate --ray-address: joining an existing Ray cluster ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """A Ray head on 127.0.0.1 started for this test (its own process group), stopped after it."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    assert ray, "the ray CLI is installed with flwr[simulation]"
    temp = Path(tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp"))  # short: Ray's socket paths are limited
    port = _free_port()
    head = subprocess.Popen(
        [
            ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        env={**ENV, "RAY_USAGE_STATS_ENABLED": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not list(temp.glob("session_*/logs/raylet.out")) or not _listening(port):
            assert head.poll() is None, head.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline, "ray head did not start within 120 s"
            time.sleep(1)
        yield f"127.0.0.1:{port}", temp
    finally:
        # Only the processes this test started: the head's process group.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(head.pid, sig)
            except ProcessLookupError:
                break
            try:
                head.wait(timeout=30)
                time.sleep(2)
            except subprocess.TimeoutExpired:
                continue
        shutil.rmtree(temp, ignore_errors=True)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.slow
def test_simulate_joins_an_existing_ray_cluster_with_a_quiet_console(ray_head, tmp_path):
    address, temp = ray_head
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            *FEDLORA, "simulate", "--ray-address", address, "--clients", "2", "--rounds", "1", "--rank", "2",
            "--local-steps", "2", "--batch-size", "8", "--out", str(out),
            "--set", "data.num_train=40", "--set", "data.num_test=16", "--set", "model.max_length=16",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    # The run's driver connected to this cluster (nothing else does): Ray logs each driver that
    # joins in the cluster's own session directory.
    assert list(temp.glob("session_*/logs/python-core-driver-*")), "the run did not join the cluster"
    assert f"on Ray cluster {address}" in stdout
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    # The default console: header, data, result lines, summary; none of Flower's or Ray's internals.
    assert "round   1/1" in stdout and "fedlora simulate: summary" in stdout
    assert "final test accuracy" in stdout and "no DP" in stdout
    for noise in ("DEBUG", "DEPRECATED", "run_simulation", "ClientAppActor", "LOAD REPORT"):
        assert noise not in stdout + stderr, noise


# --- what a newcomer reads (issue 24, point 6)


def test_evaluate_prints_the_scores_without_transformers_load_report(adapter_dir):
    proc = fedlora("evaluate", str(adapter_dir))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "examples: accuracy" in proc.stdout
    # The bare base's head is "MISSING ... newly initialized" to transformers; the adapter carries it.
    for noise in ("LOAD REPORT", "MISSING", "newly initialized", "Loading weights"):
        assert noise not in proc.stdout + proc.stderr, noise


def test_help_pages_describe_what_they_do():
    evaluate = fedlora("evaluate", "--help").stdout
    assert "--instruction-column COLUMN" in evaluate and "--response-column COLUMN" in evaluate
    assert "device to evaluate on" in evaluate and "training device" not in evaluate
    report = fedlora("report", "--help").stdout
    assert "privacy_report.md, .html and .json" in report  # a description, not only the usage line
    simulate = fedlora("simulate", "--help").stdout
    assert "--instruction-column COLUMN" in simulate and "--response-column COLUMN" in simulate


def test_column_flags_reach_the_config():
    from fedlora.cli import build_config, build_parser

    args = build_parser().parse_args(["simulate", "--instruction-column", "q", "--response-column", "a"])
    cfg = build_config(args)
    assert (cfg.data.instruction_column, cfg.data.response_column) == ("q", "a")


def test_the_header_says_why_train_loss_is_a_dash_under_dp(tmp_path):
    from fedlora.config import RunConfig, with_overrides
    from simulations.runner import _header

    plain = _header(RunConfig(), tmp_path, None)
    record_dp = with_overrides(RunConfig(), {"privacy.mode": "record", "privacy.epsilon": 3})
    dp = _header(record_dp, tmp_path, None)
    assert "train loss" not in plain
    assert "train loss: '-' under DP: clients send no loss" in dp
