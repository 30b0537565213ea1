"""`sslstream train -m`: every combination checked first, each run in turn as its own MLflow
run under one parent run; a failing child is reported, the others still run, exit 1."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import main
from sslstream.orchestration.schema import expand_sweep, swept_keys
from sslstream.orchestration.train.sweep import child_run_name

from tests.orchestration.test_train import sqlite_uri, tiny


def test_combinations_come_in_hydras_order():
    assert expand_sweep(["method=byol,simclr", "optim.lr=0.5,1.0", "seed=3"]) == [
        ["method=byol", "optim.lr=0.5", "seed=3"], ["method=byol", "optim.lr=1.0", "seed=3"],
        ["method=simclr", "optim.lr=0.5", "seed=3"], ["method=simclr", "optim.lr=1.0", "seed=3"]]
    # brace patterns are values, not sweeps; choices sweep like keys
    assert expand_sweep(["data.train=s3://b/t-{000000..000003}.tar", "recipe=cifar,imagenet"]) == [
        ["data.train='s3://b/t-{000000..000003}.tar'", "recipe=cifar"],
        ["data.train='s3://b/t-{000000..000003}.tar'", "recipe=imagenet"]]
    sweep = ["method=byol,simclr", "optim.lr=0.5", "backbone.widths=[8,16,16,32]"]
    assert swept_keys(sweep) == {"method"}  # a list value is not a sweep
    assert child_run_name("byol-synthetic", swept_keys(sweep),
                          ["method=byol", "optim.lr=0.5", "backbone.widths=[8,16,16,32]"]) == \
        "byol-synthetic-method=byol"


def test_a_sweep_without_m_and_a_bad_child_exit_2_before_anything_runs(in_tmp_cwd, capsys,
                                                                       monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["train", "optim.lr=0.5,1.0"]) == 2
    assert "sslstream train -m optim.lr=0.5,1.0" in capsys.readouterr().err
    # simclr has no predictor: its child is refused, so byol's never starts
    args = ["train", "-m", "method=byol,simclr", *tiny(in_tmp_cwd, steps=2)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "unknown config key method.pred_hidden_dim" in err
    assert list(in_tmp_cwd.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_each_child_is_a_run_under_the_parent_and_a_failure_does_not_stop_the_rest(
        in_tmp_cwd, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # lr 1e30 blows the weights up (NonFiniteLossError: exit 1 for that child)
    args = ["train", "-m", "optim=sgd", "optim.lr=1e30,0.05", "trainer.grad_clip=null",
            "trainer.checkpoint_every_steps=1", "eval.probe=false",
            *tiny(in_tmp_cwd, steps=12)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "sweep 1/2" in captured.out and "sweep 2/2" in captured.out
    assert "sweep: 1/2 runs succeeded" in captured.out
    assert "FAILED: optim=sgd optim.lr=1e+30" in captured.err  # as Hydra writes the value
    client = MlflowClient(sqlite_uri(in_tmp_cwd))
    runs = client.search_runs(client.get_experiment_by_name("sslstream").experiment_id)
    parent = next(r for r in runs if "sslstream.sweep" in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FAILED" and len(children) == 2
    by_name = {r.data.tags["sslstream.run_name"]: r for r in children}
    assert set(by_name) == {"byol-synthetic-optim.lr=1e+30", "byol-synthetic-optim.lr=0.05"}
    assert by_name["byol-synthetic-optim.lr=0.05"].info.status == "FINISHED"
    assert by_name["byol-synthetic-optim.lr=1e+30"].info.status == "FAILED"
    assert (in_tmp_cwd / "out" / "byol-synthetic-optim.lr=0.05").is_dir()  # its own run_name
