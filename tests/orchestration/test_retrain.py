"""The retraining decision flow against a real S3-compatible server (moto) and a real
`mlflow server`, both on 127.0.0.1, with the training step replaced by a fast stand-in
that registers through the real registry code (orchestration/tracking/registry.py).

The end-to-end runs with the real trainer are in test_retrain_e2e.py.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.retrain import job as R
from sslstream.orchestration.retrain.lease import Lease, LeaseRecord
from sslstream.orchestration.retrain.stores import S3LeaseStore
from sslstream.orchestration.schema import compose_config
from sslstream.orchestration.tracking.registry import RegistrySettings, register_encoder
from sslstream.pipelines.shards.snapshot import take_snapshot

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.s3, pytest.mark.mlflow_server]


def make_config(src: str, s3, mlflow_uri: str, tmp: Path, model: str, **retrain: Any
                ) -> DictConfig:
    """The composed config (conf/ and the schema's defaults) for retraining ``src``;
    ``retrain`` keys as keyword arguments (a mapping for retrain.lock)."""
    keys = {f"retrain.{k}": v for k, v in retrain.items() if not isinstance(v, dict)}
    keys |= {f"retrain.{k}.{kk}": vv for k, v in retrain.items() if isinstance(v, dict)
             for kk, vv in v.items()}
    cfg = compose_config([
        "data=shards", f"data.train={src}", "data.test=null", "run_name=ignored",
        f"trainer.output_dir={tmp / 'outputs'}", "trainer.epochs=1",
        f"tracking.uri={mlflow_uri}", f"tracking.experiment=exp-{model}",
        f"tracking.registry.name={model}", "tracking.registry.margin=0.01",
        *(f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in keys.items())])
    with open_dict(cfg):
        cfg.data.storage_options = s3.storage_options
    return cfg


class FakeTrain:
    """Stands in for orchestration.train.loop.train: opens/resumes the MLflow run named
    cfg.run_name and registers a version through the real registry code, with the kNN
    accuracy and collapse metrics it is told to report."""

    def __init__(self, knn: float = 0.5, std: float = 0.1, fail: Exception | None = None,
                 sleep_s: float = 0.0) -> None:
        self.knn, self.std, self.fail, self.sleep_s = knn, std, fail, sleep_s
        self.calls: list[DictConfig] = []

    def __call__(self, cfg: DictConfig) -> SimpleNamespace:
        self.calls.append(cfg)
        client = MlflowClient(cfg.tracking.uri)
        exp = client.get_experiment_by_name(cfg.tracking.experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(cfg.tracking.experiment)
        runs = client.search_runs([exp_id], f"attributes.run_name = '{cfg.run_name}'")
        run_id = runs[0].info.run_id if runs else client.create_run(
            exp_id, run_name=str(cfg.run_name)).info.run_id
        deadline = time.monotonic() + self.sleep_s
        while time.monotonic() < deadline:  # "training": interruptible between steps
            time.sleep(0.02)
        if self.fail is not None and not isinstance(self.fail, KeyboardInterrupt):
            raise self.fail
        settings = RegistrySettings(**OmegaConf.to_container(cfg.tracking.registry))
        decision = register_encoder(
            cfg.tracking.uri, f"runs:/{run_id}/encoder", settings,
            metrics={"eval/knn_acc": self.knn, "eval/embedding_std": self.std,
                     "eval/effective_rank": 20.0},
            feature_dim=128, run_id=run_id)
        client.set_terminated(run_id)
        return SimpleNamespace(status="completed", run_id=run_id, stopped_by=None,
                               registered_uri=decision.uri, promoted=decision.promoted)


def put_shards(s3, bucket: str, names: list[str], manifest: bool = False) -> str:
    """Shards of random bytes (the snapshot never reads their content) under s3://bucket/train."""
    import hashlib
    import os

    fs = s3.fs()
    entries = []
    for n in names:
        data = os.urandom(512)
        fs.pipe_file(f"{bucket}/train/{n}", data)
        entries.append({"shard": n, "samples": 4, "sha256": hashlib.sha256(data).hexdigest()})
    if manifest:
        fs.pipe_file(f"{bucket}/train/manifest.json", json.dumps({"shards": entries}).encode())
    return f"s3://{bucket}/train"


def versions(uri: str, model: str) -> list[int]:
    return sorted(int(v.version) for v in MlflowClient(uri).search_model_versions(
        f"name = '{model}'"))


def champion(uri: str, model: str) -> int | None:
    aliases = MlflowClient(uri).get_registered_model(model).aliases
    return int(aliases["champion"]) if "champion" in aliases else None


@pytest.fixture
def setup(s3, mlflow_server, tmp_path):
    model = f"enc-{uuid.uuid4().hex[:8]}"
    bucket = s3.bucket(f"data-{model}")
    source = put_shards(s3, bucket, [f"train-{i:06d}.tar" for i in range(3)])

    def cfg(**kw: Any) -> DictConfig:
        return make_config(source, s3, mlflow_server, tmp_path, model, **kw)

    return SimpleNamespace(s3=s3, uri=mlflow_server, model=model, bucket=bucket,
                           source=source, cfg=cfg, tmp=tmp_path)


@pytest.mark.timeout(180)
def test_trains_then_does_nothing_then_retrains_on_new_shards(setup, capsys) -> None:
    fake = FakeTrain(knn=0.5)
    assert R.retrain(setup.cfg(), train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 1
    snap = take_snapshot(setup.source, setup.s3.storage_options)
    tcfg = fake.calls[0]
    assert list(tcfg.data.train) == snap.urls and list(tcfg.data.bank) == snap.urls
    assert tcfg.run_name.startswith(f"{setup.model}-{snap.id[:12]}-")
    assert versions(setup.uri, setup.model) == [1] and champion(setup.uri, setup.model) == 1
    client = MlflowClient(setup.uri)
    mv = client.get_model_version(setup.model, "1")
    assert mv.tags["retrain.snapshot_id"] == snap.id
    assert mv.tags["retrain.run_key"] == tcfg.run_name
    assert mv.tags["retrain.decision"] == "promoted"
    run = client.get_run(mv.run_id)
    assert run.data.tags["retrain.decision"] == "promoted"
    listing = json.loads(Path(client.download_artifacts(
        mv.run_id, "retrain/snapshot.json", str(setup.tmp))).read_text())
    assert listing["id"] == snap.id and len(listing["shards"]) == 3
    assert "v1 (champion)" in capsys.readouterr().out

    # nothing new: exit 0, no training, no version
    assert R.retrain(setup.cfg(), train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 1 and versions(setup.uri, setup.model) == [1]
    assert "nothing to do" in capsys.readouterr().out
    rm = client.get_registered_model(setup.model)
    assert rm.tags["retrain.last_decision"] == "nothing-new"

    # a shard arrives: a new run key, a new version, promoted (0.6 > 0.5 + 0.01)
    put_shards(setup.s3, setup.bucket, ["train-000003.tar"])
    fake.knn = 0.6
    assert R.retrain(setup.cfg(), train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 2 and fake.calls[1].run_name != tcfg.run_name
    assert len(fake.calls[1].data.train) == 4
    assert versions(setup.uri, setup.model) == [1, 2] and champion(setup.uri, setup.model) == 2
    mv2 = client.get_model_version(setup.model, "2")
    assert mv2.tags["retrain.new_shards"] == "1" and mv2.tags["retrain.shards"] == "4"

    # a shard removed: nothing new (every current shard is in the champion's data)
    setup.s3.fs().rm(f"{setup.bucket}/train/train-000000.tar")
    assert R.retrain(setup.cfg(), train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 2 and versions(setup.uri, setup.model) == [1, 2]

    # a shard rewritten under the same name counts as new data
    setup.s3.fs().pipe_file(f"{setup.bucket}/train/train-000001.tar", b"changed" * 50)
    fake.knn = 0.7
    assert R.retrain(setup.cfg(), train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 3 and versions(setup.uri, setup.model) == [1, 2, 3]


@pytest.mark.timeout(180)
def test_worse_or_collapsed_challenger_is_registered_not_promoted(setup) -> None:
    assert R.retrain(setup.cfg(), train_fn=FakeTrain(knn=0.5)) == R.EXIT_OK
    put_shards(setup.s3, setup.bucket, ["train-000003.tar"])
    collapsed = FakeTrain(knn=0.9, std=1e-4)  # better kNN, but collapsed embeddings
    assert R.retrain(setup.cfg(), train_fn=collapsed) == R.EXIT_OK
    assert versions(setup.uri, setup.model) == [1, 2] and champion(setup.uri, setup.model) == 1
    mv = MlflowClient(setup.uri).get_model_version(setup.model, "2")
    assert mv.tags["retrain.decision"] == "registered-not-promoted"
    assert "collapsed" in mv.tags["retrain.reason"]
    # the next scheduled call finds run key -> v2 and does not train the same data again
    again = FakeTrain(knn=0.9)
    assert R.retrain(setup.cfg(), train_fn=again) == R.EXIT_OK
    assert not again.calls and versions(setup.uri, setup.model) == [1, 2]
    # within the margin (0.51 < 0.5 + 0.01) is not better either
    put_shards(setup.s3, setup.bucket, ["train-000004.tar"])
    assert R.retrain(setup.cfg(), train_fn=FakeTrain(knn=0.505)) == R.EXIT_OK
    assert versions(setup.uri, setup.model) == [1, 2, 3] and champion(setup.uri, setup.model) == 1


@pytest.mark.timeout(180)
def test_crash_after_registration_is_finished_without_a_second_version(setup) -> None:
    def crash_after_register(cfg: DictConfig):
        FakeTrain(knn=0.5)(cfg)
        raise RuntimeError("node lost after registering")

    assert R.retrain(setup.cfg(), train_fn=crash_after_register) == R.EXIT_TRAIN_FAILED
    assert versions(setup.uri, setup.model) == [1]
    mv = MlflowClient(setup.uri).get_model_version(setup.model, "1")
    assert "retrain.run_key" not in mv.tags  # the crash came before retrain's bookkeeping
    retry = FakeTrain()
    assert R.retrain(setup.cfg(), train_fn=retry) == R.EXIT_OK
    assert not retry.calls and versions(setup.uri, setup.model) == [1]
    mv = MlflowClient(setup.uri).get_model_version(setup.model, "1")
    assert mv.tags["retrain.decision"] == "promoted" and "retrain.snapshot_id" in mv.tags
    assert R.retrain(setup.cfg(), train_fn=retry) == R.EXIT_OK  # and now: nothing new
    assert not retry.calls


@pytest.mark.timeout(120)
def test_exit_codes_for_lock_source_tracking_and_training_failures(setup, capsys) -> None:
    cfg = setup.cfg()
    st = R.RetrainSettings.from_config(cfg, setup.model)
    assert st.lock_url == f"{setup.source}/_sslstream_retrain.{setup.model}.lease"
    other = Lease(S3LeaseStore(st.lock_url, setup.s3.storage_options), "someone-else", ttl_s=600)
    other.try_acquire()
    fake = FakeTrain()
    assert R.retrain(cfg, train_fn=fake) == R.EXIT_LOCK_HELD
    assert "held by" in capsys.readouterr().err and not fake.calls
    # for schedulers that cannot tell "skip" from "fail": the same refusal as exit 0
    assert R.retrain(setup.cfg(lock={"held_exit_code": 0}), train_fn=fake) == R.EXIT_OK
    assert "skipped: lease" in capsys.readouterr().out and not fake.calls
    with pytest.raises(ConfigError, match="retrain.lock.held_exit_code=1"):  # exit 2, the schema's
        setup.cfg(lock={"held_exit_code": 1})
    other.release()

    bad_source = setup.cfg(source=f"s3://{setup.bucket}/no-such-prefix")
    assert R.retrain(bad_source, train_fn=fake) == R.EXIT_SOURCE
    assert "no-such-prefix" in capsys.readouterr().err

    dead = setup.cfg()
    dead.tracking.uri = "http://127.0.0.1:9"  # discard port: connection refused
    assert R.retrain(dead, train_fn=fake) == R.EXIT_REGISTRY
    assert "unreachable" in capsys.readouterr().err and not fake.calls

    with pytest.raises(ConfigError, match="retrain.init=warm"):
        setup.cfg(init="warm")
    assert R.retrain(setup.cfg(enabled=False), train_fn=fake) == R.EXIT_OK
    assert "retrain.enabled=false" in capsys.readouterr().out and not fake.calls

    boom = FakeTrain(fail=ValueError("loss is nan at step 3"))
    assert R.retrain(setup.cfg(), train_fn=boom) == R.EXIT_TRAIN_FAILED
    assert "loss is nan" in capsys.readouterr().err
    assert setup.s3.fs().exists(st.lock_url) is False  # the lease was released
    assert versions(setup.uri, setup.model) == []

    def preempted(cfg: DictConfig) -> SimpleNamespace:  # SIGTERM: checkpoint, then stop
        return SimpleNamespace(status="preempted", run_id=None, stopped_by="SIGTERM")

    assert R.retrain(setup.cfg(), train_fn=preempted) == R.EXIT_PREEMPTED
    assert "rerun to resume" in capsys.readouterr().err
    # with a registered model, failures are recorded on it
    assert R.retrain(setup.cfg(), train_fn=FakeTrain(knn=0.5)) == R.EXIT_OK
    put_shards(setup.s3, setup.bucket, ["train-000009.tar"])
    assert R.retrain(setup.cfg(), train_fn=boom) == R.EXIT_TRAIN_FAILED
    tags = MlflowClient(setup.uri).get_registered_model(setup.model).tags
    assert tags["retrain.last_decision"] == "failed-exit-5"
    assert "loss is nan" in tags["retrain.last_reason"]
    assert versions(setup.uri, setup.model) == [1]
    other = Lease(S3LeaseStore(st.lock_url, setup.s3.storage_options), "someone-else", ttl_s=600)
    other.try_acquire()
    assert R.retrain(setup.cfg(), train_fn=fake) == R.EXIT_LOCK_HELD  # the skip is recorded too
    tags = MlflowClient(setup.uri).get_registered_model(setup.model).tags
    assert tags["retrain.last_decision"] == "lock-held" and "someone-else" in tags[
        "retrain.last_reason"]
    other.release()


@pytest.mark.timeout(120)
def test_expired_lease_of_a_dead_holder_is_taken_over(setup, capsys) -> None:
    cfg = setup.cfg()
    st = R.RetrainSettings.from_config(cfg, setup.model)
    store = S3LeaseStore(st.lock_url, setup.s3.storage_options)
    dead = LeaseRecord("deadhost:1:x", "old-run", 0.0, 0.0, time.time() - 60, 300.0)
    assert store.create(dead.to_bytes()) is not None
    assert R.retrain(cfg, train_fn=FakeTrain()) == R.EXIT_OK
    assert "took over the expired lease of deadhost:1:x" in capsys.readouterr().out
    assert versions(setup.uri, setup.model) == [1]


@pytest.mark.timeout(120)
def test_losing_the_lease_stops_training(setup, capsys) -> None:
    cfg = setup.cfg(lock={"ttl_s": 3, "heartbeat_s": 0.3})
    st = R.RetrainSettings.from_config(cfg, setup.model)
    store = S3LeaseStore(st.lock_url, setup.s3.storage_options)

    def steal() -> None:  # another holder overwrites the lease while we train
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            cur = store.read()
            if cur is not None:
                store.replace(b'{"owner": "thief"}', cur[1])
                return
            time.sleep(0.05)

    thief = threading.Thread(target=steal)
    thief.start()
    slow = FakeTrain(sleep_s=30)
    t0 = time.monotonic()
    assert R.retrain(cfg, train_fn=slow) == R.EXIT_LEASE_LOST
    assert time.monotonic() - t0 < 15
    thief.join(5)
    assert "taken over" in capsys.readouterr().err
    assert versions(setup.uri, setup.model) == []
    assert store.read()[0] == b'{"owner": "thief"}'  # not deleted by the loser


def test_snapshot_ids_and_run_keys(s3, tmp_path) -> None:
    bucket = s3.bucket("snaps")
    src = put_shards(s3, bucket, ["b.tar", "a.tar"], manifest=True)
    snap = take_snapshot(src, s3.storage_options)
    assert [s.name for s in snap.shards] == ["a.tar", "b.tar"]
    assert all(s.fingerprint.startswith("sha256:") for s in snap.shards)
    # same listing in another order, other location: same id
    listing = [(s.name, s.fingerprint) for s in reversed(snap.shards)]
    from sslstream.orchestration.retrain.runkey import config_hash, run_key
    from sslstream.pipelines.shards.snapshot import Snapshot, snapshot_id

    assert snapshot_id(listing) == snap.id
    assert Snapshot.from_dict(json.loads(snap.to_json())).id == snap.id
    # no manifest: ETags; local files: size + mtime
    s3.fs().rm(f"{bucket}/train/manifest.json")
    etag = take_snapshot(src, s3.storage_options)
    assert all(s.fingerprint.startswith("etag:") for s in etag.shards)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x-000000.tar").write_bytes(b"x" * 10)
    local = take_snapshot(str(tmp_path / "d"))
    assert local.shards[0].fingerprint.startswith("size:10:mtime:")
    # config hash: ignored keys do not matter, others do
    a = OmegaConf.create({"optim": {"lr": 0.1}, "tracking": {"uri": "x"}})
    b = OmegaConf.create({"optim": {"lr": 0.1}, "tracking": {"uri": "y"}})
    c = OmegaConf.create({"optim": {"lr": 0.2}, "tracking": {"uri": "x"}})
    assert config_hash(a, ["tracking"]) == config_hash(b, ["tracking"])
    assert config_hash(a, ["tracking"]) != config_hash(c, ["tracking"])
    assert run_key("my model", snap.id, "f" * 64) == f"my_model-{snap.id[:12]}-ffffffff"


@pytest.mark.timeout(180)
def test_init_champion_warm_starts_from_the_champion_weights(setup, monkeypatch) -> None:
    """retrain.init=champion: the trainer gets trainer.init_from = the champion's exact
    version, and the trainer's own warm-start path (orchestration/train/warmstart.py) builds the
    method around the champion's backbone weights (online and momentum target)."""
    import torch
    from sslstream.models.backbones import build_backbone
    from sslstream.orchestration.tracking import mlflow_env
    from sslstream.orchestration.tracking.encoder_model import EncoderSpec
    from sslstream.orchestration.tracking.tracker import Tracker, TrackingSettings
    from sslstream.orchestration.train.warmstart import backbone_weights, build_method_warm

    backbone_cfg = OmegaConf.to_container(OmegaConf.load(REPO / "conf/backbone/resnet_mini.yaml"))
    torch.manual_seed(123)
    champ_backbone = build_backbone(backbone_cfg).eval()
    tracker = Tracker(TrackingSettings.from_config({
        "uri": setup.uri, "experiment": f"exp-{setup.model}", "system_metrics": False,
        "registry": {"name": setup.model}}))
    tracker.start("hand-made-champion", {"method": {"name": "byol"}})
    spec = EncoderSpec(backbone=backbone_cfg, feature_dim=128, image_size=32,
                       mean=(0.5,) * 3, std=(0.25,) * 3)
    v1 = tracker.register_encoder(tracker.log_encoder(champ_backbone, spec),
                                  {"eval/knn_acc": 0.3, "eval/embedding_std": 0.1,
                                   "eval/effective_rank": 20.0}, feature_dim=128)
    tracker.end()
    assert v1.promoted

    def cfg(init: str) -> DictConfig:
        c = setup.cfg(init=init)
        c.method = compose_config(["method=byol", "recipe=cifar"]).method
        c.backbone = compose_config(["backbone=resnet_mini"]).backbone
        c.trainer.init_from = None
        c.tracking.http.max_retries = 1
        return c

    seen: list[dict] = []

    def warm_train(tcfg: DictConfig) -> SimpleNamespace:
        weights = backbone_weights(tcfg, str(tcfg.trainer.init_from))
        method = build_method_warm(tcfg, weights, None)
        seen.append({"init_from": tcfg.trainer.init_from, "run_name": tcfg.run_name,
                     "online": method.backbone.state_dict(),
                     # BYOL's momentum target: momentum.target.0 is its backbone copy
                     "target": {k[len("momentum.target.0."):]: v
                                for k, v in method.state_dict().items()
                                if k.startswith("momentum.target.0.")}})
        return FakeTrain(knn=0.4)(tcfg)

    for var in (mlflow_env.ENV_MAX_RETRIES, mlflow_env.ENV_TIMEOUT, mlflow_env.ENV_BACKOFF):
        monkeypatch.setenv(var, "0")
        monkeypatch.delenv(var)  # as in a fresh `sslstream retrain` process
    assert R.retrain(cfg("champion"), train_fn=warm_train) == R.EXIT_OK
    # the retrain path bounded MLflow's HTTP client from the config (no Tracker involved)
    assert os.environ[mlflow_env.ENV_MAX_RETRIES] == "1"
    (got,) = seen
    assert got["init_from"] == f"models:/{setup.model}/{v1.version}"
    want = champ_backbone.state_dict()
    assert got["online"].keys() == want.keys()
    assert all(torch.equal(got["online"][k], want[k]) for k in want)
    assert got["target"], "BYOL's momentum target was not found in the method's state"
    assert got["target"].keys() == want.keys()
    assert all(torch.equal(got["target"][k], want[k]) for k in want)
    # a warm start from this champion is another run than a scratch run on the same data
    st = R.RetrainSettings.from_config(cfg("scratch"), setup.model)
    snap = take_snapshot(setup.source, setup.s3.storage_options)
    scratch_key = R._run_key(cfg("scratch"), st, setup.model, snap)
    assert got["run_name"] != scratch_key
    assert versions(setup.uri, setup.model) == [1, 2] and champion(setup.uri, setup.model) == 2

    # a crash after the trainer registered (and promoted) v2, before retrain's bookkeeping:
    # the retry's champion is now v2 itself, yet it must find v2, not warm-start a v3 from it
    client = MlflowClient(setup.uri)
    for k in ("retrain.run_key", "retrain.snapshot_id", "retrain.decision"):
        client.delete_model_version_tag(setup.model, "2", k)
    seen.clear()
    assert R.retrain(cfg("champion"), train_fn=warm_train) == R.EXIT_OK
    assert not seen and versions(setup.uri, setup.model) == [1, 2]
    assert client.get_model_version(setup.model, "2").tags["retrain.run_key"] == got["run_name"]


@pytest.mark.timeout(180)
def test_retrain_on_gcs_data_with_the_default_lease_next_to_it(gcs, mlflow_server, tmp_path,
                                                               capsys) -> None:
    """The same flow with the data on gs:// (tests/fixtures/gcs.py): the default lease is a
    GCS object next to the shards, taken with generation preconditions and released; the
    second call finds nothing new; a rewritten shard (new md5) retrains."""
    from sslstream.orchestration.retrain.stores import GCSLeaseStore

    from tests.fixtures.gcs import GCS_OPTIONS

    model = f"enc-gcs-{uuid.uuid4().hex[:8]}"
    for i in range(3):
        gcs.put("data", f"train/train-{i:06d}.tar", os.urandom(512))
    source = "gs://data/train"
    cfg = make_config(source, SimpleNamespace(storage_options=dict(GCS_OPTIONS)), mlflow_server,
                      tmp_path, model)
    fake = FakeTrain(knn=0.5)
    assert R.retrain(cfg, train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 1 and list(fake.calls[0].data.train) == [
        f"gs://data/train/train-{i:06d}.tar" for i in range(3)]
    assert versions(mlflow_server, model) == [1] and champion(mlflow_server, model) == 1
    lease_posts = [r for r in gcs.requests if r.startswith("POST /upload/") and ".lease" in r]
    assert lease_posts and all("ifGenerationMatch=" in r for r in lease_posts)
    assert not [n for b, n in gcs.objects if n.endswith(".lease")]  # released
    assert "v1 (champion)" in capsys.readouterr().out

    assert R.retrain(cfg, train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 1 and "nothing to do" in capsys.readouterr().out

    gcs.put("data", "train/train-000001.tar", b"changed" * 50)
    fake.knn = 0.6
    assert R.retrain(cfg, train_fn=fake) == R.EXIT_OK
    assert len(fake.calls) == 2 and versions(mlflow_server, model) == [1, 2]
    assert champion(mlflow_server, model) == 2
    assert GCSLeaseStore(f"{source}/x.lease", dict(GCS_OPTIONS)).read() is None
