"""Unlabelled training data (pure SSL, img2dataset-style shards) end to end.

The documented rule (docs/data.md, "Unlabelled data"): evaluation and registration need a
labelled split. A labelled split that is not labelled is refused *before* training, with
the fix; with `data.test=null data.bank=null eval.at_end=false eval.every_epochs=0` the run
trains to the end, checkpoints, logs its training metrics and finishes its MLflow run, and
registers its encoder as a challenger tagged `evaluated=false` that is never promoted (there
is no kNN to promote on; `tracking.registry.register_unevaluated=false`: nothing is
registered) -- never a crash after training.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import webdataset as wds
from mlflow.tracking import MlflowClient
from sslstream.orchestration.cli import main
from sslstream.orchestration.runtime import checkpoint as ckpt

from tests.fixtures.shards import make_jpeg
from tests.orchestration.test_train import sqlite_uri, tiny


def _img2dataset_like(root: Path, n: int = 48) -> str:
    root.mkdir(parents=True)
    with wds.ShardWriter(str(root / "%05d.tar"), maxcount=20) as sink:
        for i in range(n):
            sink.write({"__key__": f"{i:09d}", "jpg": make_jpeg(i, 16),
                        "txt": f"a photo number {i}",
                        "json": {"caption": f"a photo number {i}", "url": f"http://e/{i}",
                                 "width": 16, "height": 16}})
    return str(root)


def _args(tmp: Path, *extra: str, steps: int = 4) -> list[str]:
    keep = [a for a in tiny(tmp, steps=steps) if not a.startswith(("data.root", "data.generate"))]
    return ["data=shards", *keep, *extra]


@pytest.mark.timeout(180)
def test_unlabelled_training_runs_to_the_end_and_registers_a_challenger(in_tmp_cwd, capsys, caplog):
    train = _img2dataset_like(in_tmp_cwd / "crawl")
    # 1. the default config wants labels for evaluation: refused before any step
    rc = main(["train", *_args(in_tmp_cwd, f"data.train={train}", f"data.test={train}")])
    err = capsys.readouterr().err
    assert rc != 0
    assert "data.bank=" in err and "must be labelled" in err and "json{caption" in err
    assert "eval.at_end=false" in err
    assert ckpt.latest_checkpoint(in_tmp_cwd / "out" / "byol-shards") is None

    # 2. the documented unlabelled setup: trains, checkpoints, finishes, registers a
    #    challenger that is never promoted
    unlabelled = (f"data.train={train}", "data.test=null", "data.bank=null",
                  "eval.at_end=false", "eval.every_epochs=0")
    rc = main(["train", *_args(in_tmp_cwd, *unlabelled)])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "registered as a challenger tagged evaluated=false" in caplog.text
    assert "registered model: models:/sslstream-encoder/1 (challenger: not evaluated" in out.out
    last = ckpt.latest_checkpoint(in_tmp_cwd / "out" / "byol-shards")
    assert last is not None and last.name == "step-00000004.pt"
    client = MlflowClient(tracking_uri=sqlite_uri(in_tmp_cwd))
    v1 = client.get_model_version_by_alias("sslstream-encoder", "challenger")
    assert int(v1.version) == 1 and v1.tags["evaluated"] == "false"
    assert v1.tags["promoted"] == "false" and v1.tags["method"] == "byol"
    assert "champion" not in client.get_registered_model("sslstream-encoder").aliases
    runs = client.search_runs([client.get_experiment_by_name("sslstream").experiment_id])
    done = [r for r in runs if r.info.status == "FINISHED"]
    assert len(done) == 1 and "train/loss" in done[0].data.metrics
    assert done[0].data.params.get("data.label_key") == "auto"
    assert done[0].data.tags["sslstream.registered"] == "models:/sslstream-encoder/1"

    # 3. the switch off: the run finishes and registers nothing
    rc = main(["train", *_args(in_tmp_cwd, *unlabelled, "run_name=off",
                               "tracking.registry.register_unevaluated=false")])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "the encoder is not registered" in caplog.text
    assert len(client.search_model_versions("name='sslstream-encoder'")) == 1
