"""`embed` and `export` from a registered model (`models:/name@champion`), on the local
sqlite store: the output names the version the alias pointed at, its rows equal the served
pyfunc's `predict` on the same files, a newer champion's run on that output is refused
naming both versions, and the exported file answers like `predict`."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from sslstream.models.backbones import build_backbone, feature_dim_of
from sslstream.orchestration.cli import main
from sslstream.orchestration.embed import exits as X
from sslstream.orchestration.embed.export import run_exported
from sslstream.orchestration.embed.manifest import NAME
from sslstream.orchestration.embed.parquet import embeddings_of
from sslstream.orchestration.schema import compose_config
from sslstream.orchestration.tracking.encoder_model import EncoderSpec
from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings
from sslstream.pipelines.views.recipes import TwoViewRecipe

from tests.fixtures.shards import write_shard_set

pytestmark = pytest.mark.timeout(300)
D = 128
HEALTHY = {"eval/embedding_std": 0.9 / math.sqrt(D), "eval/effective_rank": 40.0}


def _register(uri: str, seed: int, knn: float) -> int:
    torch.manual_seed(seed)
    backbone = build_backbone({"name": "resnet_mini"})
    with torch.no_grad():
        backbone(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    backbone.eval()
    recipe = TwoViewRecipe.from_config(compose_config([]).augment)
    spec = EncoderSpec(backbone={"name": "resnet_mini"}, feature_dim=feature_dim_of(backbone),
                       image_size=32, mean=tuple(recipe.view1.mean), std=tuple(recipe.view1.std))
    tracker = Tracker(TrackingSettings.from_config({
        "uri": uri, "experiment": "enc", "system_metrics": False, "registry": {"name": "enc"}}))
    tracker.start(f"run{seed}", {"method": "byol"})
    decision = tracker.register_encoder(tracker.log_encoder(backbone, spec),
                                        {"eval/knn_acc": knn, **HEALTHY}, feature_dim=D)
    tracker.end()
    assert decision.promoted
    return decision.version


def test_embed_and_export_a_registered_champion(in_tmp_cwd: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    uri = f"sqlite:///{in_tmp_cwd / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    assert _register(uri, 0, 0.5) == 1
    ss = write_shard_set(in_tmp_cwd / "shards", [11, 9], image_size=32)
    args = ["embed", "--model", "models:/enc@champion", "--out", "emb",
            f"embed.source={ss.root}"]
    assert main(args) == X.EXIT_OK
    manifest = json.loads((in_tmp_cwd / "emb" / NAME).read_text())
    assert manifest["model"]["version"] == "models:/enc/1"
    assert manifest["model"]["source"] == "models:/enc@champion"
    table = pq.read_table(in_tmp_cwd / "emb")
    files = {}
    for url in ss.urls:
        with tarfile.open(url) as tf:
            files.update({m.name[:-4]: tf.extractfile(m).read() for m in tf if m.name.endswith(".jpg")})
    model = mlflow.pyfunc.load_model("models:/enc/1")
    keys = table.column("key").to_pylist()
    served = model.predict({"image_bytes": [files[k] for k in keys]})
    np.testing.assert_allclose(embeddings_of(table), served, rtol=0, atol=1e-5)

    # a newer champion may not write into v1's output
    assert _register(uri, 1, 0.6) == 2
    caplog.clear()
    assert main(args) == X.EXIT_SOURCE
    assert "of model models:/enc/1" in caplog.text and "not of models:/enc/2" in caplog.text

    # the exported champion answers like predict
    assert main(["export", "--model", "models:/enc@champion", "--format", "torchscript",
                 "--out", "enc.pt"]) == 0
    images = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(run_exported("torchscript", in_tmp_cwd / "enc.pt", images),
                               mlflow.pyfunc.load_model("models:/enc/2").predict(images),
                               rtol=0, atol=1e-4)
