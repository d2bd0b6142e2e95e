"""A round in which no client replied ends the run with a clear message (it used to go on unchanged)."""

import pytest

from fedlora.config import load_toml, with_overrides
from fedlora.protocol import TRAIN
from server.loop import FederationError
from simulations.runner import DEFAULT_SCENARIO
from tests.test_matrix import run_in_process


def test_a_round_where_every_client_timed_out_ends_the_run(tmp_path):
    over = {
        "federation.num_clients": 2,
        "federation.num_rounds": 2,
        "data.num_train": 32,
        "data.num_test": 8,
        "output.eval_initial": False,
    }
    cfg = with_overrides(load_toml(DEFAULT_SCENARIO), over)
    with pytest.raises(FederationError, match=r"round 1: no client replied within the round timeout"):
        run_in_process(cfg, tmp_path / "run", answer=lambda msg: msg.metadata.message_type != TRAIN)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert not any('"round": 2' in line for line in lines)  # stopped after round 1
