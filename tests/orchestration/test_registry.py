"""Encoder as an MLflow model: log, register, promotion rule, serving in a fresh process,
warm start, and failures, against a real ``mlflow server`` on 127.0.0.1."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from sslstream.models.backbones import build_backbone, feature_dim_of
from sslstream.orchestration.errors import RegistrationError
from sslstream.orchestration.schema.tracking import HttpSettings
from sslstream.orchestration.tracking.encoder_model import EncoderSpec
from sslstream.orchestration.tracking.promotion import collapse_reason
from sslstream.orchestration.tracking.registry import (
    RegistrySettings,
    load_encoder_state_dict,
    read_champion,
    register_encoder,
)
from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings

from tests.fixtures.mlflow_server import free_port

pytestmark = pytest.mark.timeout(180)

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)
D = 128  # resnet_mini feature width
HEALTHY = {"eval/embedding_std": 0.9 / math.sqrt(D), "eval/effective_rank": 40.0}


@pytest.fixture(scope="module")
def logged(mlflow_server: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One trained-looking resnet_mini logged as a pyfunc encoder in a run on the server."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    torch.manual_seed(0)
    backbone = build_backbone({"name": "resnet_mini"})
    backbone.train()
    with torch.no_grad():  # move BN running stats off their defaults: buffers must travel too
        for _ in range(3):
            backbone(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    backbone.eval()
    spec = EncoderSpec(backbone={"name": "resnet_mini"}, feature_dim=feature_dim_of(backbone),
                       image_size=32, mean=MEAN, std=STD)
    name = f"enc-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(TrackingSettings.from_config({
        "uri": mlflow_server, "experiment": f"reg-{uuid.uuid4().hex[:8]}",
        "system_metrics": False, "registry": {"name": name}}))
    run_id = tracker.start("encoder-run", {"method": "byol"})
    assert run_id is not None
    model_uri = tracker.log_encoder(backbone, spec)
    return {"tracker": tracker, "backbone": backbone, "spec": spec, "name": name,
            "model_uri": model_uri, "run_id": run_id, "uri": mlflow_server}


def _aliases(uri: str, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in MlflowClient(uri, registry_uri=uri)
            .get_registered_model(name).aliases.items()}


def _reference_embed(backbone: torch.nn.Module, images: np.ndarray, size: int) -> np.ndarray:
    """The in-process answer, computed without orchestration.tracking.encoder_model's code."""
    from torchvision.transforms.v2 import functional as F

    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(torch.float64) / 255.0
    if x.shape[-2:] != (size, size):
        x = F.center_crop(F.resize(x.float(), [size], antialias=True), [size]).double()
    x = (x - torch.tensor(MEAN, dtype=torch.float64).view(1, 3, 1, 1)) / torch.tensor(
        STD, dtype=torch.float64).view(1, 3, 1, 1)
    with torch.no_grad():
        return backbone(x.float()).numpy()


SERVE = textwrap.dedent("""
    import sys, numpy as np, torch, mlflow
    from PIL import Image
    torch.set_num_threads(1)
    model_uri, out_dir, *groups = sys.argv[1:]
    model = mlflow.pyfunc.load_model(model_uri)
    print("INPUT", model.metadata.get_input_schema())
    print("CONTRACT", sorted(model.metadata.metadata["sslstream_inputs"]))
    for i, group in enumerate(groups):
        batch = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in group.split(",")])
        np.save(f"{out_dir}/emb{i}.npy", model.predict(batch))
""")


@pytest.mark.mlflow_server
def test_champion_served_in_fresh_process_matches_backbone(logged: dict, tmp_path: Path) -> None:
    uri, name = logged["uri"], logged["name"]
    decision = logged["tracker"].register_encoder(
        logged["model_uri"], {"eval/knn_acc": 0.5, **HEALTHY}, feature_dim=D,
        tags={"method": "byol", "data_manifest": "sha256:abc"})
    assert decision.promoted and decision.uri == f"models:/{name}/{decision.version}"
    rng = np.random.default_rng(0)
    square = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    wide = [rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)]
    paths = []
    for i, img in enumerate(square + wide):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(img).save(paths[-1])  # PNG: lossless, so both sides see the same pixels
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri)
    proc = subprocess.run(
        [sys.executable, "-c", SERVE, f"models:/{name}@champion", str(tmp_path),
         ",".join(map(str, paths[:3])), str(paths[3])],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # no input schema (MLflow would cast floats to uint8); the model's metadata says what it takes
    assert proc.stdout.split("INPUT ", 1)[1].splitlines()[0] == "None"
    assert "['image_bytes', 'images', 'resize']" in proc.stdout
    served_square, served_wide = (np.load(tmp_path / f"emb{i}.npy") for i in range(2))
    assert served_square.dtype == np.float32 and served_square.shape == (3, D)
    want = _reference_embed(logged["backbone"], np.stack(square), 32)
    np.testing.assert_allclose(served_square, want, rtol=1e-4, atol=1e-5)
    want_wide = _reference_embed(logged["backbone"], np.stack(wide), 32)
    np.testing.assert_allclose(served_wide, want_wide, rtol=1e-4, atol=1e-4)
    # a fresh random backbone would not match: the weights (and BN buffers) were loaded
    other = build_backbone({"name": "resnet_mini"}).eval()
    assert not np.allclose(_reference_embed(other, np.stack(square), 32), want, atol=1e-3)

    tags = MlflowClient(uri, registry_uri=uri).get_model_version(name, str(decision.version)).tags
    assert tags["method"] == "byol" and tags["data_manifest"] == "sha256:abc"
    assert float(tags["eval/knn_acc"]) == 0.5 and tags["promoted"] == "true"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent,
                          capture_output=True, text=True)
    if head.returncode == 0:  # run from a git checkout: the version names a real commit
        kind = subprocess.run(["git", "cat-file", "-t", tags["git_commit"]],
                              cwd=Path(__file__).parent, capture_output=True, text=True)
        assert len(tags["git_commit"]) == 40 and kind.stdout.strip() == "commit"
    else:
        assert "git_commit" not in tags


@pytest.mark.mlflow_server
def test_promotion_rule(logged: dict) -> None:
    uri, model_uri = logged["uri"], logged["model_uri"]
    name = f"promo-{uuid.uuid4().hex[:8]}"
    settings = RegistrySettings(name=name)

    def reg(knn: float, s: RegistrySettings = settings, **collapse: float):
        metrics = {"eval/knn_acc": knn, **HEALTHY, **collapse}
        return register_encoder(uri, model_uri, s, metrics=metrics, feature_dim=D,
                                run_id=logged["run_id"])

    assert read_champion(uri, name) is None  # no such model yet
    v1 = reg(0.50)
    assert v1.promoted and v1.previous_champion is None
    assert _aliases(uri, name) == {"champion": v1.version, "challenger": v1.version}
    v2 = reg(0.60)  # better: promoted
    assert v2.promoted and v2.previous_champion == v1.version
    assert _aliases(uri, name) == {"champion": v2.version, "challenger": v2.version}
    v3 = reg(0.55)  # worse: only challenger
    assert not v3.promoted and "does not beat" in v3.reason
    assert _aliases(uri, name) == {"champion": v2.version, "challenger": v3.version}
    v4 = reg(0.60)  # a tie does not beat the champion
    assert not v4.promoted
    v5 = reg(0.95, **{"eval/embedding_std": 1e-5})  # collapsed: never promoted
    assert not v5.promoted and "collapsed" in v5.reason
    v6 = reg(0.95, **{"eval/effective_rank": 1.0})  # dimensional collapse
    assert not v6.promoted and "effective_rank" in v6.reason
    v7 = reg(float("nan"))
    assert not v7.promoted and "not finite" in v7.reason
    margin = RegistrySettings(name=name, margin=0.05)
    v8 = reg(0.64, margin)  # beats 0.60 by 0.04 < margin
    assert not v8.promoted and "margin 0.05" in v8.reason
    v9 = reg(0.66, margin)
    assert v9.promoted
    assert _aliases(uri, name) == {"champion": v9.version, "challenger": v9.version}
    client = MlflowClient(uri, registry_uri=uri)
    assert int(client.get_model_version_by_alias(name, "champion").version) == v9.version
    assert client.get_model_version(name, str(v5.version)).tags["promoted"] == "false"

    champ = read_champion(uri, name)
    assert champ is not None and champ.version == v9.version
    assert champ.metric == pytest.approx(0.66) and champ.uri == f"models:/{name}/{v9.version}"


@pytest.mark.mlflow_server
def test_warm_start_state_dict_from_registry(logged: dict) -> None:
    uri = logged["uri"]
    name = f"warm-{uuid.uuid4().hex[:8]}"
    register_encoder(uri, logged["model_uri"], RegistrySettings(name=name),
                     metrics={"eval/knn_acc": 0.3, **HEALTHY}, feature_dim=D)
    state, spec = load_encoder_state_dict(uri, f"models:/{name}@champion")
    assert spec == logged["spec"]
    want = logged["backbone"].state_dict()
    assert state.keys() == want.keys()
    assert all(torch.equal(state[k], want[k]) for k in want)
    fresh = build_backbone(spec.backbone)
    fresh.load_state_dict(state)  # strict: the spec rebuilds the same architecture


def test_collapse_reason_thresholds() -> None:
    s = RegistrySettings(min_std_ratio=0.1, min_effective_rank=2.0)
    assert collapse_reason({"eval/embedding_std": 1 / math.sqrt(64),
                            "eval/effective_rank": 10.0}, 64, s) is None
    assert "embedding_std" in collapse_reason({"eval/embedding_std": 0.0}, 64, s)
    assert "embedding_std" in collapse_reason({"eval/embedding_std": float("nan")}, 64, s)
    assert "effective_rank" in collapse_reason({"eval/effective_rank": 1.2}, 64, s)
    off = RegistrySettings(min_std_ratio=None, min_effective_rank=None)
    assert collapse_reason({"eval/embedding_std": 0.0, "eval/effective_rank": 1.0}, 64, off) is None


@pytest.mark.mlflow_server
def test_registration_errors_are_clear(mlflow_server: str) -> None:
    with pytest.raises(RegistrationError, match=r"promotion metric.*eval/knn_acc"):
        register_encoder(mlflow_server, "models:/m-0", RegistrySettings(name="x"),
                         metrics={"knn": 0.5}, feature_dim=D)
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(RegistrationError) as err:
        register_encoder(dead, "models:/m-0123", RegistrySettings(name="enc-dead"),
                         metrics={"eval/knn_acc": 0.5, **HEALTHY}, feature_dim=D)
    assert time.monotonic() - t0 < 15
    assert "'enc-dead'" in str(err.value) and dead in str(err.value)


@pytest.mark.timeout(60)
def test_registry_calls_outside_a_tracker_are_bounded_on_a_dead_server(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """read_champion / register_encoder / warm-start loads run without a Tracker (retrain,
    user scripts): with none of MLFLOW_HTTP_REQUEST_* set, MLflow's own defaults would
    retry for ~250 s; the registry applies the bounded defaults itself."""
    from sslstream.orchestration.tracking import mlflow_env

    for var in (mlflow_env.ENV_MAX_RETRIES, mlflow_env.ENV_TIMEOUT, mlflow_env.ENV_BACKOFF):
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)  # restored (removed) after the test
    dead = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(Exception) as err:
        read_champion(dead, "enc-dead")
    assert time.monotonic() - t0 < 20, "registry call on a dead server was not bounded"
    assert "127.0.0.1" in str(err.value)
    assert os.environ[mlflow_env.ENV_MAX_RETRIES] == str(HttpSettings().max_retries)


@pytest.mark.mlflow_server
def test_concurrent_promotion_does_not_let_the_worse_version_win(
        logged: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """B (0.6) decides against champion v1 (0.5); before B writes the alias, A (0.9)
    registers and becomes champion. B must re-decide against A and stay challenger."""
    import sslstream.orchestration.tracking.promotion as promotion

    uri, model_uri = logged["uri"], logged["model_uri"]
    name = f"race-{uuid.uuid4().hex[:8]}"
    settings = RegistrySettings(name=name)

    def register(knn: float):
        return register_encoder(uri, model_uri, settings, feature_dim=D,
                                metrics={"eval/knn_acc": knn, **HEALTHY})

    v1 = register(0.5)
    real_decide = promotion.decide
    injected: list = []

    def decide_then_race(client, champion, new_metric, *args, **kwargs):
        out = real_decide(client, champion, new_metric, *args, **kwargs)
        if new_metric == 0.6 and not injected:
            injected.append(register(0.9))  # the other scheduler, between B's read and write
        return out

    monkeypatch.setattr(promotion, "decide", decide_then_race)
    b = register(0.6)
    a = injected[0]
    assert a.promoted and a.previous_champion == v1.version
    assert not b.promoted and "does not beat" in b.reason and f"v{a.version}" in b.reason
    assert _aliases(uri, name)["champion"] == a.version
    tags = MlflowClient(uri, registry_uri=uri).get_model_version(name, str(b.version)).tags
    assert tags["promoted"] == "false"


@pytest.mark.mlflow_server
def test_version_tags_name_the_training_data(logged: dict, tmp_path: Path) -> None:
    """data_manifest_hash: sha256 over the sorted (shard, content sha256) list, recomputed
    here from the manifest without the project's code."""
    import hashlib

    folder = tmp_path / "train"
    folder.mkdir()
    entries = []
    for n in ("train-000001.tar", "train-000000.tar"):
        data = os.urandom(256)
        (folder / n).write_bytes(data)
        entries.append({"shard": n, "samples": 4, "sha256": hashlib.sha256(data).hexdigest()})
    (folder / "manifest.json").write_text(json.dumps({"shards": entries}))
    want = hashlib.sha256(json.dumps(sorted([e["shard"], "sha256:" + e["sha256"]]
                                            for e in entries),
                                     separators=(",", ":")).encode()).hexdigest()
    name = f"data-{uuid.uuid4().hex[:8]}"
    tracker = Tracker(TrackingSettings.from_config({
        "uri": logged["uri"], "experiment": f"reg-{uuid.uuid4().hex[:8]}",
        "system_metrics": False, "registry": {"name": name}}))
    tracker.start("data-run", {"method": {"name": "byol"},
                               "data": {"train": str(folder), "storage_options": {}}})
    decision = tracker.register_encoder(logged["model_uri"], {"eval/knn_acc": 0.4, **HEALTHY},
                                        feature_dim=D, tags={"method": "byol"})
    tracker.end()
    tags = MlflowClient(logged["uri"]).get_model_version(name, str(decision.version)).tags
    assert tags["data_manifest_hash"] == f"sha256:{want}" and tags["data_shards"] == "2"
    assert tags["method"] == "byol" and float(tags["eval/knn_acc"]) == 0.4


@pytest.mark.mlflow_server
def test_vit_encoder_logs_loads_and_predicts_like_the_module(logged: dict) -> None:
    """A ViT encoder goes the ResNet's way: logged with timm in its requirements, loaded by
    mlflow.pyfunc.load_model (backbones.py shipped and imported under a private name) and
    predicting the in-process module's embeddings; the ResNet's requirements lack timm."""
    import importlib.metadata

    import mlflow
    from sslstream.orchestration.tracking.mlflow_env import scoped_tracking_uri

    torch.manual_seed(0)
    cfg = {"name": "vit_tiny", "image_size": 32, "patch_size": 4, "drop_path_rate": 0.1,
           "kwargs": {"depth": 2}}
    vit = build_backbone(cfg).eval()
    spec = EncoderSpec(backbone=cfg, feature_dim=feature_dim_of(vit), image_size=32,
                       mean=MEAN, std=STD)
    tracker = logged["tracker"]
    model_uri = tracker.log_encoder(vit, spec, name="vit-encoder")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    wide = rng.integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
    with scoped_tracking_uri(logged["uri"]):
        served = mlflow.pyfunc.load_model(model_uri)
        got, got_wide = served.predict(images), served.predict(wide)
    assert got.shape == (3, 192) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference_embed(vit, images, 32), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_wide, _reference_embed(vit, wide, 32), rtol=1e-4, atol=1e-4)
    other = build_backbone(cfg).eval()  # another random ViT: the weights travelled
    assert not np.allclose(_reference_embed(other, images, 32), got, atol=1e-3)
    timm_pin = f"timm=={importlib.metadata.version('timm')}"
    with scoped_tracking_uri(logged["uri"]):
        vit_txt = Path(mlflow.pyfunc.get_model_dependencies(model_uri)).read_text()
        resnet_txt = Path(mlflow.pyfunc.get_model_dependencies(logged["model_uri"])).read_text()
    assert timm_pin in vit_txt.splitlines() and "timm" not in resnet_txt
    # warm start: the registry's state dict rebuilds the same ViT
    name = f"vit-{uuid.uuid4().hex[:8]}"
    register_encoder(logged["uri"], model_uri, RegistrySettings(name=name),
                     metrics={"eval/knn_acc": 0.3, "eval/embedding_std": 0.9 / math.sqrt(192),
                              "eval/effective_rank": 40.0}, feature_dim=192)
    state, got_spec = load_encoder_state_dict(logged["uri"], f"models:/{name}@champion")
    assert got_spec == spec
    fresh = build_backbone(got_spec.backbone)
    fresh.load_state_dict(state)
    assert all(torch.equal(state[k], v) for k, v in vit.state_dict().items())
