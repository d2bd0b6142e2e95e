"""Operator mistakes lose nothing: unsafe resumes, reused out-dirs, NaN/inf config, bad data rows,
rounds in which every update is rejected, an unknown strategy, outputs readable by others."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import torch

from fedlora.config import ConfigError, RunConfig, load_toml, with_overrides
from fedlora.data.sources import DataError, load_task_data
from fedlora.protocol import UPDATE, encode_arrays
from server.loop import FederationError, ServerRun
from server.outputs import OutputError
from server.resume import ResumeError
from strategies.registry import RegistryError
from tests.adversary.fakegrid import grid_of, small_config
from tests.adversary.packing import unpacked


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"train.lr": "inf"}, "train.lr = 'inf': expected a finite number"),
        ({"train.lr": float("nan")}, "train.lr = nan: expected a finite number"),
        ({"privacy.delta": "-inf"}, "privacy.delta = '-inf': expected a finite number"),
        ({"federation.num_rounds": "inf"}, "federation.num_rounds = 'inf': expected a finite integer"),
        ({"federation.num_rounds": float("inf")}, "expected a finite integer"),
        ({"lora.ranks": "4,inf"}, "lora.ranks = 'inf': expected a finite integer"),
    ],
)
def test_config_refuses_nan_and_inf(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        with_overrides(RunConfig(), override)


def test_toml_nan_is_refused(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text("[train]\nlr = nan\n")
    with pytest.raises(ConfigError, match=r"train\.lr = nan"):
        load_toml(path)


ROWS = [json.dumps({"text": f"t {i}", "label": "x" if i % 2 else "y"}) for i in range(6)]


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("[1, 2]", "line 7: a row must be a JSON object"),
        (json.dumps({"text": "late"}), "line 7 has no 'label'"),
        (json.dumps({"text": "late", "label": ["x"]}), "line 7 has a list label"),
        (json.dumps({"text": "late", "label": {"a": 1}}), "line 7 has a dict label"),
        (json.dumps({"text": "late", "label": ""}), "line 7 has an empty 'label'"),
        (json.dumps({"text": "late", "label": None}), "line 7 has an empty 'label'"),
    ],
)
def test_bad_data_rows_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join([*ROWS, bad]) + "\n")
    with pytest.raises(DataError, match=f"d.jsonl'? {message}"):
        load_task_data(with_overrides(RunConfig(), {"data.source": str(path)}).data, "classification")


def test_empty_csv_label_cell_names_the_line(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\n" + "a b,x\nc d,y\n" * 3 + "e f,\n")
    with pytest.raises(DataError, match="line 8 has an empty 'label'"):
        load_task_data(with_overrides(RunConfig(), {"data.source": str(path)}).data, "classification")


def test_unknown_strategy_is_refused_before_any_data_loads(tmp_path, task_identity):
    cfg = small_config(
        tmp_path / "run", **{"federation.strategy": "fedsgd", "data.source": str(tmp_path / "missing.csv")}
    )
    with pytest.raises(RegistryError, match="unknown strategy 'fedsgd'"):
        ServerRun(grid_of(4), cfg, tmp_path / "run")  # a DataError would mean the data loaded first


def test_resume_allows_safe_changes_and_refuses_unsafe_ones(run_fed, tmp_path):
    first = run_fed(**{"federation.num_rounds": 1})
    out = first.out
    before = (out / "metrics.jsonl").read_text()
    for change, listed in [
        ({"federation.strategy": "flexlora"}, ["federation.strategy: 'fedit' -> 'flexlora'"]),
        (
            {"lora.rank": 4, "privacy.mode": "client", "privacy.noise_multiplier": 1.0},
            ["lora.rank: 2 -> 4", "privacy.mode: 'none' -> 'client'", "privacy.noise_multiplier: 0.0 -> 1.0"],
        ),
    ]:
        cfg = small_config(out, **{"federation.num_rounds": 2, "output.resume": True, **change})
        with pytest.raises(ResumeError) as err:
            ServerRun(grid_of(4), cfg, out).run()
        assert all(item in str(err.value) for item in listed), str(err.value)
        assert (out / "metrics.jsonl").read_text() == before  # nothing lost
    cfg = small_config(
        out, **{"federation.num_rounds": 2, "federation.round_timeout": 60, "output.resume": True}
    )
    ServerRun(grid_of(4), cfg, out).run()
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    resume = next(r for r in rows if r["kind"] == "resume")
    assert resume["changes"] == [
        "federation.num_rounds: 1 -> 2",
        "federation.round_timeout: 0.0 -> 60.0",
    ]
    assert [r["round"] for r in rows if r["kind"] == "global"] == [0, 1, 2]


def test_out_dir_holding_a_run_is_refused_without_resume(run_fed):
    first = run_fed(**{"federation.num_rounds": 1})
    before = (first.out / "metrics.jsonl").read_text()
    with pytest.raises(OutputError, match="already holds a run"):
        ServerRun(grid_of(4), small_config(first.out, **{"federation.num_rounds": 1}), first.out)
    assert (first.out / "metrics.jsonl").read_text() == before


def test_round_with_every_update_rejected_ends_the_run_with_reasons(run_fed):
    def bad(msg, content):
        content[UPDATE] = encode_arrays({k: torch.zeros(1) for k in list(unpacked(content[UPDATE]))[:1]})
        return content

    run = run_fed(grid_of(4, {n: bad for n in (11, 12, 13, 14)}), expect_error=True)
    assert isinstance(run.error, FederationError)
    text = str(run.error)
    assert "round 1: every update was rejected" in text and "node 14: malformed reply" in text
    assert [r["round"] for r in run.rows if r["kind"] == "global"] == [0, 1]  # recorded, then stopped


def test_run_outputs_are_owner_only(run_fed):
    run = run_fed(**{"federation.num_rounds": 1})
    for path in [run.out, *run.out.rglob("*")]:
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), f"{path} is {oct(mode)}"
