"""Atomic checkpoints: a crash or a damaged file never costs the last good checkpoint."""

import os
import select
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fedlora.checkpoint import (
    CheckpointError,
    load_checkpoint,
    prev_path,
    read_checkpoint,
    save_checkpoint,
)


def _state(round_number: int) -> dict:
    return {
        "round": round_number,
        "adapter": {
            "layer.0.lora_A": torch.full((2, 3), float(round_number)),
            "layer.0.lora_B": torch.zeros(3, 2),
        },
        "strategy": {"name": "fedavg", "momentum": None, "lr": 0.5},
        "privacy": {"ledger": [{"client": "c1", "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 40}]},
        "metrics": [{"round": r, "loss": 1.0 / (r + 1)} for r in range(round_number)],
        "flags": (True, False),
    }


def _assert_state_equal(got: dict, want: dict) -> None:
    assert got["round"] == want["round"]
    for key, tensor in want["adapter"].items():
        assert torch.equal(got["adapter"][key], tensor)
    assert got["strategy"] == want["strategy"]
    assert got["privacy"] == want["privacy"]
    assert got["metrics"] == want["metrics"]
    assert tuple(got["flags"]) == want["flags"]


def test_roundtrip_and_prev_kept(tmp_path):
    path = tmp_path / "ckpt" / "server.ckpt"
    save_checkpoint(path, _state(1))
    assert not prev_path(path).exists()
    save_checkpoint(path, _state(2))
    _assert_state_equal(load_checkpoint(path), _state(2))
    _assert_state_equal(read_checkpoint(prev_path(path)), _state(1))
    save_checkpoint(path, _state(3))
    _assert_state_equal(read_checkpoint(prev_path(path)), _state(2))
    assert sorted(p.name for p in path.parent.iterdir()) == ["server.ckpt", "server.ckpt.prev"]


@pytest.mark.parametrize("keep", [0, 10, 60, -1])
def test_truncated_latest_falls_back_to_prev(tmp_path, keep):
    path = tmp_path / "server.ckpt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep >= 0 else len(data) - 1])
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    with pytest.warns(RuntimeWarning, match="previous checkpoint"):
        state = load_checkpoint(path)
    _assert_state_equal(state, _state(1))


def test_bit_flip_is_detected(tmp_path):
    path = tmp_path / "server.ckpt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        read_checkpoint(path)
    with pytest.warns(RuntimeWarning):
        _assert_state_equal(load_checkpoint(path), _state(1))


def test_foreign_file_rejected(tmp_path):
    path = tmp_path / "server.ckpt"
    torch.save({"round": 1}, path)
    with pytest.raises(CheckpointError, match="not a fedlora checkpoint"):
        load_checkpoint(path)


def test_both_unusable_names_both(tmp_path):
    path = tmp_path / "server.ckpt"
    save_checkpoint(path, _state(1))
    save_checkpoint(path, _state(2))
    path.write_bytes(b"")
    prev_path(path).write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"latest.*previous"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="fresh run"):
        load_checkpoint(tmp_path / "none.ckpt")


def test_unsupported_values_are_named(tmp_path):
    np = pytest.importorskip("numpy")
    with pytest.raises(TypeError, match=r"state\['strategy'\]\['m'\].*torch.from_numpy"):
        save_checkpoint(tmp_path / "x.ckpt", {"strategy": {"m": np.zeros(2)}})
    with pytest.raises(TypeError, match="non-string key"):
        save_checkpoint(tmp_path / "x.ckpt", {"metrics": {1: 0.5}})
    assert not list(tmp_path.iterdir())


_WRITER = textwrap.dedent(
    """
    import os, sys, time, torch
    from fedlora import checkpoint

    path = sys.argv[1]
    checkpoint.save_checkpoint(path, {"round": 1, "w": torch.ones(4)})

    class SlowFile:
        # Writes half of the data, reports in, then hangs: the parent kills us mid-write.
        def __init__(self, handle):
            self.handle = handle
        def write(self, data):
            if len(data) > 1000:
                self.handle.write(data[: len(data) // 2])
                self.handle.flush()
                print("MIDWRITE", flush=True)
                time.sleep(60)
            return self.handle.write(data)
        def __getattr__(self, name):
            return getattr(self.handle, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            return self.handle.__exit__(*exc)

    import builtins
    real_open = builtins.open
    from fedlora import atomic
    atomic.open = lambda *a, **k: SlowFile(real_open(*a, **k))
    checkpoint.save_checkpoint(path, {"round": 2, "w": torch.zeros(100_000)})
    """
)


def test_killed_mid_write_keeps_last_good(tmp_path):
    path = tmp_path / "server.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.getcwd(),
        env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "writer did not reach the write within 60 s"
        line = proc.stdout.readline()
        assert line.strip() == "MIDWRITE", f"writer did not reach the write: {line!r}"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".server.ckpt.tmp-")]
    assert leftovers, "the killed writer should have left a partial temp file"
    state = load_checkpoint(path)  # no warning: the latest file was never touched
    assert state["round"] == 1 and torch.equal(state["w"], torch.ones(4))
    # the next save cleans up the debris
    save_checkpoint(path, {"round": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["server.ckpt", "server.ckpt.prev"]
    assert load_checkpoint(path)["round"] == 2
