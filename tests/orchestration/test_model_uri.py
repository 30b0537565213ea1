"""A printed model URI works from any folder: the end-of-run lines name its store (credentials
masked) with a load command, and loading against a store that does not exist creates none."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from sslstream.orchestration.cli import main
from sslstream.orchestration.tracking.mlflow_env import StoreNotFound, local_store_path
from sslstream.orchestration.tracking.registry import load_encoder_state_dict
from sslstream.orchestration.train.report import end_of_run_lines
from sslstream.orchestration.train.result import TrainResult


def test_loading_from_a_missing_store_fails_and_creates_nothing(tmp_path):
    db = tmp_path / "elsewhere" / "mlflow.db"
    with pytest.raises(StoreNotFound, match="no MLflow store at sqlite:///"):
        load_encoder_state_dict(f"sqlite:///{db}", "models:/sslstream-encoder/1")
    assert not db.exists() and not db.parent.exists()
    with pytest.raises(StoreNotFound):
        load_encoder_state_dict(f"file://{tmp_path}/mlruns", "models:/sslstream-encoder/1")
    assert list(tmp_path.iterdir()) == []
    assert local_store_path("http://host:5000") is None
    assert local_store_path("databricks") is None


def test_eval_of_a_model_uri_in_an_empty_folder_names_the_store(tmp_path, monkeypatch, capsys):
    """The issue's case: the URI printed in the run's folder, loaded from another one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["eval", "--model", "models:/sslstream-encoder/1"]) == 1
    err = capsys.readouterr().err
    assert f"no MLflow store at sqlite:///{tmp_path}/mlflow.db" in err
    assert "MLFLOW_TRACKING_URI" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no stray mlflow.db, no data


def test_end_of_run_lines_name_the_store_masked_with_a_load_command():
    from sslstream.orchestration.tracking.tracker import Tracker

    shown = Tracker.from_config(OmegaConf.create({"uri": "http://alice:s3cret@mlflow.example:5000"}),
                                active=False).shown_uri
    res = TrainResult("completed", 6, 6, 1, Path("/x"), run_id="abc", registered_uri=
                      "models:/sslstream-encoder/3", promoted=True, tracking_uri=shown)
    text = "\n".join(end_of_run_lines(res, 12.0))
    assert "s3cret" not in text and "alice" not in text
    assert "registered model: models:/sslstream-encoder/3 (champion)" in text
    assert ("load it from any folder: MLFLOW_TRACKING_URI='http://***@mlflow.example:5000' "
            "sslstream eval --model models:/sslstream-encoder/3  (*** = your credentials)") in text
    assert "done in 12s: 6 steps, MLflow run abc in http://***@mlflow.example:5000" in text
    off = TrainResult("completed", 2, 2, 0, Path("/x"))
    assert end_of_run_lines(off, 36.0) == ["done in 36s: 2 steps, tracking off"]


def test_the_load_command_names_the_evaluation_data_from_any_folder(tmp_path, monkeypatch):
    """Relative data paths (the default ./data/synthetic) become absolute, URLs and brace
    patterns stay as they are (shell-quoted), lists stay lists, num_classes goes along."""
    from sslstream.orchestration.train.report import eval_data_overrides

    monkeypatch.chdir(tmp_path)
    data = OmegaConf.create({"root": "./data/synthetic", "train": "${.root}/train",
                             "test": "${.root}/test", "bank": "${.train}", "num_classes": 10})
    assert eval_data_overrides(data) == [f"data.bank={tmp_path}/data/synthetic/train",
                                         f"data.test={tmp_path}/data/synthetic/test",
                                         "data.num_classes=10"]
    remote = OmegaConf.create({"bank": "s3://b/train-{000000..000009}.tar",
                               "test": ["s3://b/val-0.tar", "val-1.tar"], "num_classes": None})
    assert eval_data_overrides(remote) == ["data.bank=s3://b/train-{000000..000009}.tar",
                                           f"data.test=[s3://b/val-0.tar,{tmp_path}/val-1.tar]",
                                           "data.num_classes=null"]
    res = TrainResult("completed", 6, 6, 1, Path("/x"), registered_uri="models:/enc/1",
                      promoted=True, tracking_uri="sqlite:////tmp/s/mlflow.db")
    text = "\n".join(end_of_run_lines(res, 1.0, eval_data_overrides(remote)))
    assert ("sslstream eval --model models:/enc/1 'data.bank=s3://b/train-{000000..000009}.tar' "
            f"'data.test=[s3://b/val-0.tar,{tmp_path}/val-1.tar]' data.num_classes=null") in text


def test_a_model_the_store_does_not_hold_is_one_line_naming_the_store(tmp_path):
    from mlflow.tracking import MlflowClient
    from sslstream.orchestration.errors import UserError
    from sslstream.orchestration.tracking.registry import ModelNotFound

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    MlflowClient(tracking_uri=uri).search_experiments()  # an existing, empty store
    with pytest.raises(ModelNotFound, match=f"models:/nope/1 is not in the MLflow store at {uri}"):
        load_encoder_state_dict(uri, "models:/nope/1")
    assert issubclass(ModelNotFound, UserError)  # the CLI prints it as one line, exit 1
