"""Run outputs are written atomically and owner-only (a node's ledger or metrics are the operator's)."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from fedlora.atomic import atomic_write, atomic_write_text, private_dir
from fedlora.checkpoint import save_checkpoint


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_is_owner_only_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        target = atomic_write_text(tmp_path / "new" / "out.json", "{}")
    finally:
        os.umask(old)
    assert target.read_text() == "{}"
    assert _mode(target) == 0o600
    assert _mode(target.parent) == 0o700


def test_atomic_write_tightens_an_existing_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "m.txt"
    target.write_text("old")
    os.chmod(target, 0o644)
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.txt"]


def test_failed_writer_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.txt"
    atomic_write_text(target, "good")

    def boom(handle):
        handle.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, boom)
    assert target.read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.txt"]


def test_checkpoints_are_owner_only(tmp_path):
    run = private_dir(tmp_path / "run")
    path = save_checkpoint(run / "checkpoint.pt", {"w": torch.ones(2)})
    save_checkpoint(path, {"w": torch.zeros(2)})
    assert _mode(path) == 0o600 and _mode(run / "checkpoint.pt.prev") == 0o600
