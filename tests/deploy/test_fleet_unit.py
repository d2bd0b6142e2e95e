"""Fast checks of the fleet harness pieces that need no Flower processes."""

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import psutil
import pytest

from fedlora.deploy.fleet import Fleet, FleetError
from fedlora.deploy.flwr_cli import config_arg, last_json, write_connection
from fedlora.deploy.processes import kill_trees


def test_write_connection_merges_and_sets_default(tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    write_connection(tmp_path, "a", "127.0.0.1:9000", root_certificates=ca)
    write_connection(tmp_path, "b", "10.0.0.1:9000", insecure=True, make_default=False)
    config = tomllib.loads((tmp_path / "config.toml").read_text())
    assert config["superlink"]["default"] == "a"
    assert config["superlink"]["a"] == {"address": "127.0.0.1:9000", "root-certificates": str(ca.resolve())}
    assert config["superlink"]["b"] == {"address": "10.0.0.1:9000", "insecure": True}
    with pytest.raises(ValueError, match="either insecure or"):
        write_connection(tmp_path, "c", "h:1", root_certificates=ca, insecure=True)


def test_connection_is_readable_by_flower(tmp_path, monkeypatch):
    from flwr.cli.flower_config import read_superlink_connection

    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    write_connection(tmp_path, "prod", "link.example.org:9093", root_certificates=ca)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    conn = read_superlink_connection(None)
    assert (conn.name, conn.address, conn.root_certificates, conn.insecure) == (
        "prod",
        "link.example.org:9093",
        str(ca.resolve()),
        False,
    )


def test_config_arg_forms(tmp_path):
    assert config_arg(None, tmp_path / "x.toml") is None
    assert config_arg("a=1 b='x'", tmp_path / "x.toml") == "a=1 b='x'"
    path = config_arg({"partition-id": 1, "data-path": "/d ir/f.csv", "dp-epsilon": 2.5}, tmp_path / "n.toml")
    assert tomllib.loads((tmp_path / "n.toml").read_text()) == {
        "partition-id": 1,
        "data-path": "/d ir/f.csv",
        "dp-epsilon": 2.5,
    }
    assert path == str(tmp_path / "n.toml")


def test_node_auth_without_tls_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="needs TLS"):
        Fleet(tmp_path, tls=False, node_auth=True)


def test_nodes_need_a_superlink(tmp_path):
    with Fleet(tmp_path) as fleet, pytest.raises(FleetError, match="start_superlink"):
        fleet.add_node("n0")


def test_last_json_skips_banner():
    assert last_json('Using SuperLink: x\n{\n  "success": true, "run-id": "7"\n}\n') == {
        "success": True,
        "run-id": "7",
    }
    with pytest.raises(FleetError, match="Expected JSON"):
        last_json("no json here")


def test_kill_trees_reaches_descendants_in_other_sessions():
    # parent -> child in a NEW session (like the SuperLink's flower-superexec) -> grandchild.
    # Each process says "up" on the shared pipe once it runs: no clock decides when all three exist.
    script = textwrap.dedent(
        """
        import subprocess, sys, time
        sleeper = [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(600)"]
        inner = f"import subprocess, time; subprocess.Popen({sleeper!r}); "
        inner += "print('up', flush=True); time.sleep(600)"
        subprocess.Popen([sys.executable, "-c", inner], start_new_session=True)
        print("up", flush=True)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, start_new_session=True)
    family = []
    try:
        assert [parent.stdout.readline().strip() for _ in range(3)] == [b"up"] * 3
        family = [psutil.Process(parent.pid), *psutil.Process(parent.pid).children(recursive=True)]
        assert len(family) == 3
        kill_trees([parent.pid], grace=2.0)
        parent.wait(300)
        _, alive = psutil.wait_procs(family, timeout=300)  # returns as soon as all are gone
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
    finally:
        for proc in family:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        if parent.poll() is None:
            parent.kill()
        parent.stdout.close()


def test_fedlora_node_puts_the_ledger_in_its_state_dir(tmp_path):
    from fedlora.deploy.node import with_state_dir

    state = tmp_path / "state"
    state.mkdir()
    assert with_state_dir(None, state) == f'state-dir="{state}"'
    assert with_state_dir("partition-id=1", state) == f'partition-id=1 state-dir="{state}"'
    assert with_state_dir('state-dir="/elsewhere" lora-rank=8', state) == 'state-dir="/elsewhere" lora-rank=8'
    toml = tmp_path / "node.toml"
    toml.write_text('partition-id = 2\ndevice = "cpu"\n')
    merged = with_state_dir(str(toml), state)
    expected = {"partition-id": 2, "device": "cpu", "state-dir": str(state)}
    assert tomllib.loads(Path(merged).read_text()) == expected


def test_command_lines(tmp_path):
    from fedlora.deploy.certs import PkiPaths
    from fedlora.deploy.commands import superlink_command, supernode_command

    pki = PkiPaths.in_dir(tmp_path)
    link = superlink_command("127.0.0.1", 9093, tmp_path / "state.db", pki=pki, node_auth=True)
    assert link[1:] == [
        "--ssl-ca-certfile", str(pki.ca_cert), "--ssl-certfile", str(pki.server_cert),
        "--ssl-keyfile", str(pki.server_key), "--enable-supernode-auth",
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", "9093",
        "--database", str(tmp_path / "state.db"),
    ]  # fmt: skip
    plain = superlink_command("::1", 1, tmp_path / "db", pki=None, node_auth=False)
    assert plain[1] == "--insecure" and "--enable-supernode-auth" not in plain
    node = supernode_command("h:1", port=2, root_certificates=pki.ca_cert, private_key=tmp_path / "k",
                             node_config="a=1", max_retries=0)  # fmt: skip
    assert node[1:] == ["--superlink", "h:1", "--root-certificates", str(pki.ca_cert),
                        "--auth-supernode-private-key", str(tmp_path / "k"), "--node-config", "a=1",
                        "--port", "2", "--max-retries", "0"]  # fmt: skip
    insecure = supernode_command("h:1", insecure=True, private_key=tmp_path / "k")
    assert insecure[1:] == ["--superlink", "h:1", "--insecure"]
