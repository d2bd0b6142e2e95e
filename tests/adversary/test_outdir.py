"""The operator's files cannot be overwritten through links planted in a run or state directory.

The attacker is another local user. Before :func:`fedlora.atomic.owned_dir`, an out-dir owned by
someone else (mode 0777) was accepted, and links planted in it made the server overwrite files
outside it (``metrics.png`` via savefig + chmod, ``adapter/fedlora.json``, a dangling
``metrics.jsonl`` link); ``fedlora node`` resolved a linked state dir and wrote its merged node
config 0644.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from fedlora.atomic import UnsafeDirectoryError, owned_dir
from fedlora.deploy.node import node_main, with_state_dir
from fedlora.export import META_FILE, save_peft_adapter
from server.loop import ServerRun
from server.outputs import OutputError, RunOutputs, plot_metrics
from tests.adversary.fakegrid import grid_of, small_config

VICTIM = "the operator's own file\n"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "outside" / "important.txt"
    path.parent.mkdir()
    path.write_text(VICTIM)
    path.chmod(0o644)
    return path


def test_an_out_dir_writable_by_others_is_refused_before_anything_is_written(tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    out.chmod(0o777)
    with pytest.raises(UnsafeDirectoryError, match=r"writable by others \(mode 777\).*chmod go-w"):
        ServerRun(grid_of(2), small_config(out), out)
    assert list(out.iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "getuid") or os.getuid() != 0, reason="chown needs root")
def test_an_out_dir_owned_by_another_user_is_refused(tmp_path):
    out = tmp_path / "theirs"
    out.mkdir(mode=0o700)
    os.chown(out, 65534, 65534)
    with pytest.raises(UnsafeDirectoryError, match="belongs to uid 65534"):
        RunOutputs(out, small_config(out))


def test_a_linked_out_dir_is_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(UnsafeDirectoryError, match="is a link"):
        owned_dir(tmp_path / "link")


def test_a_dangling_metrics_link_counts_as_a_run_and_is_never_written_through(tmp_path, victim):
    out = owned_dir(tmp_path / "run")
    target = victim.parent / "created-by-the-server.jsonl"
    (out / "metrics.jsonl").symlink_to(target)
    with pytest.raises(OutputError, match="already holds a run"):
        RunOutputs(out, small_config(out))
    outputs = RunOutputs(out, small_config(out), resume=True)
    with pytest.raises(UnsafeDirectoryError, match="symbolic link"):
        outputs.log({"kind": "global", "round": 0})
    assert not target.exists()


def test_plot_and_export_replace_planted_links_instead_of_following_them(tmp_path, victim):
    out = owned_dir(tmp_path / "run")
    (out / "metrics.jsonl").write_text(
        json.dumps({"kind": "global", "round": 1, "test_accuracy": 0.5, "test_loss": 1.0}) + "\n"
    )
    (out / "metrics.png").symlink_to(victim)
    plot_metrics(out / "metrics.jsonl", out / "metrics.png")
    adapter = owned_dir(out / "adapter")
    (adapter / META_FILE).symlink_to(victim)
    (adapter / "adapter_model.safetensors").symlink_to(victim)
    state = {"m.lora_A.weight": torch.zeros(2, 4), "m.lora_B.weight": torch.zeros(4, 2)}
    save_peft_adapter(
        adapter,
        state,
        meta={"labels": []},
        base_model="minilm",
        task="classification",
        alpha=4.0,
        target_modules=("m",),
        head_modules=(),
    )
    assert victim.read_text() == VICTIM and stat.S_IMODE(victim.stat().st_mode) == 0o644
    for name in (out / "metrics.png", adapter / META_FILE, adapter / "adapter_model.safetensors"):
        assert not name.is_symlink() and stat.S_IMODE(name.stat().st_mode) == 0o600


def test_fedlora_node_refuses_a_linked_state_dir_and_writes_its_node_config_0600(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "state").symlink_to(real)
    assert (
        node_main(["--state-dir", str(tmp_path / "state"), "--insecure", "--superlink", "127.0.0.1:1"]) == 2
    )
    assert "is a link" in capsys.readouterr().err
    conf = tmp_path / "node.toml"
    conf.write_text('data-path = "/data/site.csv"\ndp-epsilon = 4.0\n')
    state = owned_dir(tmp_path / "node-state")
    merged = Path(with_state_dir(str(conf), state))
    assert stat.S_IMODE(merged.stat().st_mode) == 0o600 and "state-dir" in merged.read_text()
