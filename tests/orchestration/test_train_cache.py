"""`sslstream train` with the local shard cache, shards on a real S3 server (moto):
a limit below a shard is a config error before training; a damaged cache file is counted
in the run's metrics (MLflow `data/cache_corrupt`) and its log line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import main
from sslstream.pipelines.shards.synthetic import ensure_synthetic

from tests.fixtures.s3 import S3Env
from tests.orchestration.test_train import sqlite_uri, tiny

pytestmark = [pytest.mark.s3]


@pytest.fixture
def s3_data(s3: S3Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The synthetic set (160 + 60 samples, 16 px) on S3; overrides that train from it."""
    root = tmp_path / "local"
    ensure_synthetic(root, train_samples=160, test_samples=60, image_size=16, seed=0)
    s3.bucket("data")
    train, test = s3.upload(root / "train", "data/train"), s3.upload(root / "test", "data/test")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    return [f"data.train={train}", f"data.test={test}", "data.generate=false"]


@pytest.mark.timeout(120)
def test_a_cache_limit_below_a_shard_is_a_config_error(s3_data, in_tmp_cwd, capsys) -> None:
    base = tiny(in_tmp_cwd, *s3_data, "tracking.enabled=false", steps=2)
    assert main(["train", *base, f"data.cache_dir={in_tmp_cwd / 'cache'}", "data.cache_limit=1000"]) == 2
    err = capsys.readouterr().err
    assert "data.cache_limit=1000 bytes is smaller than the shard s3://data/" in err
    assert "Traceback" not in err
    assert not (in_tmp_cwd / "cache" / "objects").exists()  # no shard was read
    assert not (in_tmp_cwd / "out").exists() or not any((in_tmp_cwd / "out").rglob("step-*.pt"))
    assert main(["train", *base, "data.cache_limit=-1"]) == 2  # the schema's range


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_damaged_cache_file_reaches_the_run_metrics_and_log(s3_data, in_tmp_cwd, capfd) -> None:
    """The warning comes from the reader process (its stderr): captured at the fd level."""
    cache = in_tmp_cwd / "cache"
    extra = [*s3_data, f"data.cache_dir={cache}", "data.cache_limit=100000000",
             "eval.at_end=false", "eval.every_epochs=0"]
    assert main(["train", *tiny(in_tmp_cwd, *extra, "run_name=first", steps=2)]) == 0
    metas = sorted((cache / "objects").glob("*.json"))
    assert metas, "the first run cached nothing"
    victim = cache / "objects" / metas[0].stem
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated on disk
    url = json.loads(metas[0].read_text())["url"]
    capfd.readouterr()
    assert main(["train", *tiny(in_tmp_cwd, *extra, "run_name=second", steps=2)]) == 0
    out = capfd.readouterr()
    assert "cache_corrupt=1" in out.out
    assert f"cache file of {url} is corrupt or truncated" in out.err
    client = MlflowClient(tracking_uri=sqlite_uri(in_tmp_cwd))
    runs = {r.info.run_name: r for r in client.search_runs(
        [client.get_experiment_by_name("sslstream").experiment_id])}
    assert runs["second"].data.metrics["data/cache_corrupt"] == 1
    assert runs["first"].data.metrics["data/cache_fetched"] >= 1
    assert runs["second"].data.metrics["data/cache_fetched"] == 1  # only the damaged one
