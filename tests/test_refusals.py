"""What ``fedlora simulate`` refuses, and how: at once, in one line, with exit status 2, touching nothing.

A refused command creates no run directory and changes nothing in an existing one; ``--resume``
starts from the run's own configuration; an unreachable ``--ray-address`` is one line, not minutes
of Ray retries; a refusal that needs no model or data imports neither transformers nor peft.
"""

import json
import random
import socket
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fedlora.checkpoint import save_checkpoint
from fedlora.cli import build_config, build_parser, main
from fedlora.config import ConfigError, RunConfig, load_toml, to_toml, with_overrides
from fedlora.derive import derive_config
from simulations.runner import DEFAULT_SCENARIO

ROOT = Path(__file__).resolve().parent.parent
SMALL = {
    "federation.num_clients": 2,
    "federation.num_rounds": 3,
    "data.num_train": 40,
    "data.num_test": 16,
    "model.max_length": 16,
    "train.lr": 0.001,
}
HEAVY = ("transformers", "peft", "datasets", "flwr", "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def run_dir(tmp_path) -> tuple[Path, RunConfig]:
    """A run directory as a 2-client run leaves it after round 1 (config files, metrics, checkpoint)."""
    run = (tmp_path / "runs" / "wd").resolve()
    cfg = with_overrides(load_toml(DEFAULT_SCENARIO), {**SMALL, "output.out_dir": str(run)})
    cfg = derive_config(cfg, check=True)[0]  # what the run recorded: task and length derived
    run.mkdir(parents=True)
    (run / "resolved_config.json").write_text(cfg.to_json())
    (run / "config.toml").write_text(to_toml(cfg))
    (run / "partitions.json").write_text('[{"client": 0, "size": 20}, {"client": 1, "size": 20}]')
    (run / "metrics.jsonl").write_text('{"kind": "global", "round": 0}\n{"kind": "global", "round": 1}\n')
    state = {"base_model.x.lora_A.weight": torch.zeros(2, 4), "base_model.x.lora_B.weight": torch.zeros(4, 2)}
    save_checkpoint(
        run / "checkpoint.pt",
        {"round": 1, "state": state, "strategy": {}, "privacy": {}, "rng": random.Random(0).getstate(),
         "config": cfg.to_json()},
    )  # fmt: skip
    return run, cfg


def snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    """Every file below ``directory`` with its bytes and modification time."""
    return {
        str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def parse(*argv: str) -> RunConfig:
    return build_config(build_parser().parse_args(["simulate", *argv]))


# --- resume reads the run's own configuration


def test_resume_starts_from_the_runs_own_configuration(run_dir):
    run, cfg = run_dir
    resumed = parse("--out", str(run), "--resume")
    assert resumed.output.resume
    assert replace(resumed, output=cfg.output) == cfg  # 2 clients, 3 rounds, tiny data: not the defaults
    longer = parse("--out", str(run), "--resume", "--rounds", "6")  # a flag on top is a change
    assert longer.federation.num_rounds == 6
    assert replace(longer, federation=cfg.federation, output=cfg.output) == cfg
    # --config still names the base explicitly (the README's recovery line)
    explicit = parse("--config", str(run / "config.toml"), "--out", str(run), "--resume")
    assert replace(explicit, output=cfg.output) == cfg
    with pytest.raises(ConfigError, match="--resume continues the run in --out DIR"):
        parse("--resume")


def test_a_refused_resume_changes_nothing_in_the_run_directory(run_dir, capsys):
    run, _ = run_dir
    before = snapshot(run)
    assert main(["simulate", "--out", str(run), "--resume", "--clients", "4"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "federation.num_clients: 2 -> 4" in err
    assert snapshot(run) == before  # config.toml, resolved_config.json, partitions.json as they were
    # Without --resume the run is refused too (exit 2: an invalid command), before any data loads.
    assert main(["simulate", "--out", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert snapshot(run) == before
    # The README's recovery line works, since nothing was overwritten.
    recovered = parse("--config", str(run / "config.toml"), "--out", str(run), "--resume")
    from server.resume import check_resume

    assert check_resume(run, derive_config(recovered, check=True)[0]) == []


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--set", "lora.target_modules=c_attn"],
            "lora.target_modules 'c_attn' name no layer of model 'minilm'",
        ),
        (["--data", "no-such-file.csv"], "no-such-file.csv"),
        (["--ray-address", "127.0.0.1:PORT"], "no Ray cluster answers at 127.0.0.1:"),
    ],
)
def test_refused_runs_leave_no_run_directory(tmp_path, capsys, args, needle):
    out = tmp_path / "runs" / "new"
    args = [a.replace("PORT", str(_free_port())) for a in args]
    assert main(["simulate", "--out", str(out), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not out.exists() and not out.parent.exists()


# --- fast refusals: nothing heavy imported, within seconds

PROBE = """
import json, sys, time
t0 = time.monotonic()
from fedlora.cli import main
status = main(sys.argv[1:])
print(json.dumps({"status": status, "seconds": time.monotonic() - t0,
                  "loaded": sorted(m for m in %r if m in sys.modules)}))
"""


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategy", "fedsgd"], "unknown strategy 'fedsgd'"),
        (["--model", "no/such-model-dir"], "model 'no/such-model-dir' is neither 'minilm'"),
        (["--model", "some-org/not-cached-model"], "nor a hub id in the Hugging Face cache"),
        (["--set", "lora.target_modules=q_proj,v_proj"], "'q_proj', 'v_proj' name no layer"),
        (["--ray-address", "127.0.0.1:PORT"], "Connection refused"),
    ],
)
def test_refusals_import_neither_transformers_nor_peft(tmp_path, args, needle):
    out = tmp_path / "run"
    args = [a.replace("PORT", str(_free_port())) for a in args]
    proc = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,), "simulate", "--out", str(out), *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["status"] == 2, proc.stderr
    assert needle in proc.stderr
    assert res["loaded"] == [], f"a refusal loaded {res['loaded']}"
    assert res["seconds"] < 10.0, res  # measured: 0.3-5 s on 2 loaded cores (torch for the strategy)
    assert not out.exists()


# --- --ray-address that no cluster answers at


@pytest.fixture
def not_ray():
    """A TCP port that accepts connections and closes them (a service that is not Ray)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"127.0.0.1:{server.getsockname()[1]}"
    server.close()


@pytest.mark.parametrize("kind", ["closed port", "not Ray"])
def test_an_unreachable_ray_address_is_one_line_and_exit_2_before_data_loads(tmp_path, kind, not_ray):
    address = f"127.0.0.1:{_free_port()}" if kind == "closed port" else not_ray
    out = tmp_path / "run"
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "simulate", "--ray-address", address, "--out", str(out)],
            cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail(f"--ray-address {address} ({kind}) was still running after 120 s")
    seconds = time.monotonic() - t0
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"fedlora simulate: error: --ray-address {address}: no Ray cluster answers")
    assert "ray start --head" in lines[0]
    assert proc.stdout == ""  # no header, no data summary: refused before the data loads
    assert not out.exists()
    assert seconds < 30, f"refused after {seconds:.0f} s"
