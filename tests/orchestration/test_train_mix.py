"""Training on a weighted mix of data.train: the per-source counts of every epoch in the
log and in MLflow; `sslstream retrain` snapshots every source and keeps the mix, each
source pinned to its snapshot's shards."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import main
from sslstream.orchestration.retrain import job as R
from sslstream.orchestration.schema import compose_config
from sslstream.pipelines.shards.snapshot import take_snapshot

from tests.orchestration.test_train import sqlite_uri, tiny


def test_the_training_config_keeps_the_mix_on_the_snapshot(shard_factory, tmp_path) -> None:
    a = shard_factory([4, 4], prefix="a")
    b = shard_factory([3, 5, 2], prefix="b")
    cfg = compose_config([
        "data=shards", f"data.train=[{{url: {a.root}, weight: 3}}, {{url: {b.root}, weight: 1}}]",
        "data.test=null", "eval.at_end=false", f"trainer.output_dir={tmp_path / 'out'}"])
    st = R.RetrainSettings.from_config(cfg, "enc")
    assert st.source == [str(a.root), str(b.root)]  # every source is watched
    snap = take_snapshot(st.source)
    assert len(snap.shards) == 5
    tcfg = R._train_config(cfg, "key", snap, None)
    train = [dict(s) for s in tcfg.data.train]
    assert [s["weight"] for s in train] == [3.0, 1.0]
    assert [list(s["url"]) for s in train] == [a.urls, b.urls]
    assert list(tcfg.data.bank) == snap.urls  # the evaluation bank: every shard once


@pytest.mark.timeout(240)
def test_each_epochs_samples_per_source_go_to_mlflow(shard_factory, in_tmp_cwd, caplog) -> None:
    a = shard_factory([10, 14, 8], prefix="a")   # 32
    b = shard_factory([6, 10], prefix="b")       # 16: weights 1:3 -> 12 + 36 per epoch
    train = f"[{{url: {a.root}, weight: 1}}, {{url: {b.root}, weight: 3}}]"
    caplog.set_level("INFO", logger="sslstream.train")
    rc = main(["train", *tiny(in_tmp_cwd, "data=shards", f"data.train={train}",
                              "data.image_size=16", "data.exact_epoch=true",
                              "eval.at_end=false", "trainer.batch_size=8",
                              f"tracking.uri={sqlite_uri(in_tmp_cwd)}", steps=12)])
    assert rc == 0
    client = MlflowClient(tracking_uri=sqlite_uri(in_tmp_cwd))
    run = client.search_runs([client.get_experiment_by_name("sslstream").experiment_id])[0]
    for i, want in enumerate([12, 36]):
        hist = client.get_metric_history(run.info.run_id, f"data/source/{i}/samples")
        assert [(m.step, m.value) for m in hist] == [(0, want), (6, want)]  # 6 steps/epoch
    assert f"source 1 ({b.root}): 36 samples (75.0%)" in caplog.text
