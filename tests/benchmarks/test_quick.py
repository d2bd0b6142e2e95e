"""Every maintained benchmark's seconds-long quick mode runs and writes its JSON and Markdown table."""

from __future__ import annotations

import json

import pytest

from benchmarks import BENCHMARKS, get
from benchmarks.__main__ import main
from benchmarks.harness import write_result


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_quick_mode_writes_json_and_table(name, tmp_path):
    result, table = get(name)(True)
    path = write_result(name, result, table, tmp_path)
    data = json.loads(path.read_text())
    assert data["benchmark"] == name and data["machine"]["cpus"] >= 1
    md = (tmp_path / f"{name}.md").read_text()
    assert md.count("\n|") >= 2  # header rule and at least one row
    if name == "aggregation":
        row = data["rows"][0]
        assert row["flexlora_rel_error_vs_dense"]["max"] < 1e-4
        assert set(row["methods"]) == {"fedit", "ffa", "flora", "hetlora", "flexlora", "fair"}
        assert (
            row["methods"]["fair"]["target_ratio"] == 1.5 and row["methods"]["fedit"]["target_ratio"] == 0.25
        )
        assert "| target |" in md
    if name == "wire_bytes":
        (model,) = data["models"].values()
        up = {m: rounds[0]["up"] for m, rounds in model["methods"].items()}
        assert up["ffa"] < up["fedit"] == up["fair"]


def test_cli_lists_and_refuses_unknown(tmp_path, capsys):
    assert main(["list"]) == 0
    assert "aggregation" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["nope", "--quick", "--out", str(tmp_path)])
    assert "unknown benchmark 'nope'" in capsys.readouterr().err
