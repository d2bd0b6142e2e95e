"""Every study's seconds-long quick mode still runs against today's code (outside the default test run)."""

from __future__ import annotations

import json

import pytest

from benchmarks.harness import write_result
from experiments import EXPERIMENTS, get
from experiments.__main__ import main


@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_quick_mode_writes_json_and_table(name, tmp_path):
    result, table = get(name)(True)
    path = write_result(name, result, table, tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == name and data["machine"]["cpus"] >= 1
    assert (tmp_path / f"{name}.md").read_text().count("\n|") >= 2
    if name == "reproducibility":
        assert data["no_dp"]["identical"] and not data["dp"]["identical"]


def test_cli_lists_and_refuses_unknown(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "dp_claim" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nope", "--quick", "--out", str(tmp_path)])
    assert "unknown experiment 'nope'" in capsys.readouterr().err
