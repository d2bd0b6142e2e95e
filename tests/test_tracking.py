"""--report-to: a run's metrics read back with TensorBoard's, MLflow's and W&B's own readers."""

import sys

import pytest

from fedlora.config import ConfigError, load_toml, with_overrides
from fedlora.tracking import Trackers, TrackingError, check_reporters, scalars
from simulations.runner import DEFAULT_SCENARIO
from tests.test_matrix import run_in_process

GLOBAL = {
    "kind": "global",
    "round": 2,
    "test_loss": 0.5,
    "dp_epsilon_max": 1.25,
    "bytes_up": 1000,
    "ok": True,
}
CLIENT = {"kind": "client", "round": 2, "node": 7, "partition": 1, "client": {"train_loss": 0.7}}


def test_scalars_of_global_and_client_lines():
    assert scalars(GLOBAL) == (2, {"test_loss": 0.5, "dp_epsilon_max": 1.25, "bytes_up": 1000.0})
    assert scalars(CLIENT) == (2, {"client/1/client/train_loss": 0.7})


def test_unknown_name_and_missing_package_say_what_to_do(monkeypatch):
    with pytest.raises(ConfigError, match=r"output\.report_to"):
        with_overrides(load_toml(DEFAULT_SCENARIO), {"output.report_to": "neptune"})
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec raises
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "wandb" else object())
    with pytest.raises(TrackingError, match=r"pip install wandb==0\.30\.0"):
        check_reporters(["wandb"])


def test_wandb_offline_run_files(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    trackers = Trackers(["wandb"], tmp_path, {"model": {"name": "minilm"}})
    trackers.log(GLOBAL)
    trackers.close()
    runs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_a_run_reported_to_tensorboard_and_mlflow_reads_back(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    over = {
        "federation.num_clients": 2,
        "federation.num_rounds": 1,
        "train.local_steps": 2,
        "data.num_train": 64,
        "data.num_test": 16,
        "output.report_to": "tensorboard,mlflow",
    }
    run_dir = tmp_path / "run"
    losses = run_in_process(with_overrides(load_toml(DEFAULT_SCENARIO), over), run_dir)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("test_loss")}
    assert sorted(tb) == [0, 1] and tb[1] == pytest.approx(losses[-1])
    assert "bytes_up" in events.Tags()["scalars"]
    assert any(t.startswith("client/0/") for t in events.Tags()["scalars"])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("fedlora").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "test_loss")}
    assert history == {0: pytest.approx(losses[0]), 1: pytest.approx(losses[-1])}
    assert run.data.params["model.name"] == "minilm"
