"""`sslstream retrain` end to end, each call a real subprocess of the CLI, against a real
S3-compatible server (moto) and a real `mlflow server`, both on 127.0.0.1, with the real
trainer at tiny sizes (16 px, narrow resnet_mini, a few CPU steps).

One scenario in order, because each step builds on the registry the previous one left:
first call trains and promotes -> no new shards: nothing done -> a new shard with two
concurrent schedulers: one trains, one is refused -> a collapsed challenger is registered
but not promoted -> a call SIGKILLed mid-training is rerun, takes over the expired lease,
resumes the same run and ends with one new version.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.retrain import job as R

pytestmark = [pytest.mark.s3, pytest.mark.mlflow_server, pytest.mark.slow]


def tiny(tmp: Path, steps: int) -> list[str]:
    """Overrides for a seconds-long CPU run (as in test_train.py)."""
    return [
        "data.image_size=16", "data.num_workers=1", "data.shuffle_buffer=64",
        "augment.view1.size=16", "augment.view2.size=16",
        "recipe=cifar",  # resnet_mini at 16 px on every data (shards default to imagenet)
        "backbone.widths=[8,16,16,32]",
        "method.proj_hidden_dim=64", "method.pred_hidden_dim=64", "method.proj_output_dim=32",
        "trainer.batch_size=16", f"trainer.max_steps={steps}", "trainer.num_threads=1",
        "trainer.loader_threads=1", "trainer.progress=log", "trainer.log_every_steps=5",
        "trainer.checkpoint_every_steps=4", f"trainer.output_dir={tmp / 'out'}",
        "eval.batch_size=64", "eval.knn_k=20", "eval.probe=false",
        "tracking.system_metrics=false", "tracking.plots=false",
    ]


class Scenario:
    def __init__(self, s3, mlflow_uri: str, tmp: Path) -> None:
        from sslstream.pipelines.shards.synthetic import ensure_synthetic

        self.s3, self.uri, self.tmp = s3, mlflow_uri, tmp
        self.model = f"enc-{uuid.uuid4().hex[:8]}"
        self.bucket = s3.bucket(f"e2e-{self.model}")
        local = ensure_synthetic(tmp / "synthetic", train_samples=320, test_samples=64,
                                 image_size=16, samples_per_shard=64)
        self.train_shards = sorted((local / "train").glob("train-*.tar*"))
        assert len(self.train_shards) == 5
        s3.upload(local / "test", f"{self.bucket}/test")
        self.uploaded = 0

    def add_shard(self) -> None:
        p = self.train_shards[self.uploaded]
        self.s3.fs().put_file(str(p), f"{self.bucket}/train/{p.name}")
        self.uploaded += 1

    def argv(self, *extra: str, steps: int = 6) -> list[str]:
        return [sys.executable, "-m", "sslstream.orchestration.cli", "retrain",
                "data=shards", f"data.train=s3://{self.bucket}/train",
                f"data.test=s3://{self.bucket}/test", "data.num_classes=10",
                f"tracking.uri={self.uri}", f"tracking.experiment={self.model}",
                f"tracking.registry.name={self.model}",
                "retrain.lock.ttl_s=4", "retrain.lock.grace_s=0", "retrain.lock.heartbeat_s=1",
                *tiny(self.tmp, steps), *extra]

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "AWS_PROFILE")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", AWS_ENDPOINT_URL=self.s3.endpoint,
                   MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
        return env

    def start(self, *extra: str, steps: int = 6) -> subprocess.Popen:
        return subprocess.Popen(self.argv(*extra, steps=steps), cwd=self.tmp, env=self.env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def run(self, *extra: str, steps: int = 6) -> tuple[int, str]:
        proc = subprocess.run(self.argv(*extra, steps=steps), cwd=self.tmp, env=self.env(),
                              capture_output=True, text=True, timeout=240)
        return proc.returncode, proc.stdout + proc.stderr

    def versions(self) -> list[int]:
        return sorted(int(v.version) for v in MlflowClient(self.uri).search_model_versions(
            f"name = '{self.model}'"))

    def champion(self) -> int:
        return int(MlflowClient(self.uri).get_registered_model(self.model).aliases["champion"])

    def runs_named(self, name: str) -> int:
        client = MlflowClient(self.uri)
        exp = client.get_experiment_by_name(self.model)
        return len(client.search_runs([exp.experiment_id], f"attributes.run_name = '{name}'"))


@pytest.mark.timeout(600)
def test_retrain_scenario_end_to_end(s3, mlflow_server, tmp_path) -> None:
    sc = Scenario(s3, mlflow_server, tmp_path)
    sc.add_shard()
    sc.add_shard()

    # 1. first call: trains on 2 shards, registers v1, promotes it (no champion yet)
    rc, out = sc.run()
    assert rc == R.EXIT_OK, out[-4000:]
    assert "no champion yet: training on 2 shards" in out
    assert sc.versions() == [1] and sc.champion() == 1
    v1 = MlflowClient(sc.uri).get_model_version(sc.model, "1")
    assert v1.tags["retrain.decision"] == "promoted" and v1.tags["retrain.shards"] == "2"

    # 2. no new shard: exit 0, nothing trained, no version
    rc, out = sc.run()
    assert rc == R.EXIT_OK and "nothing to do" in out, out[-3000:]
    assert "training run" not in out and sc.versions() == [1]

    # 3. a new shard and two schedulers at once: exactly one trains
    sc.add_shard()
    procs = [sc.start(), sc.start()]
    outs = [p.communicate(timeout=240)[0] for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert set(codes) <= {R.EXIT_OK, R.EXIT_LOCK_HELD}, outs
    assert sum("training run" in o for o in outs) == 1, outs
    if R.EXIT_LOCK_HELD in codes:
        assert any("held by" in o for o in outs)
    assert sc.versions() == [1, 2]
    v2 = MlflowClient(sc.uri).get_model_version(sc.model, "2")
    assert v2.tags["retrain.new_shards"] == "1" and v2.tags["retrain.shards"] == "3"

    sc.add_shard()
    champion_before = sc.champion()
    # 4. worse on purpose: a 1-d feature space is collapsed by construction (effective
    #    rank 1 < tracking.registry.min_effective_rank=2) -> registered, challenger only
    rc, out = sc.run("backbone.widths=[8,16,16,1]")
    assert rc == R.EXIT_OK, out[-4000:]
    assert sc.versions() == [1, 2, 3] and sc.champion() == champion_before
    v3 = MlflowClient(sc.uri).get_model_version(sc.model, "3")
    assert v3.tags["retrain.decision"] == "registered-not-promoted"
    assert "collapsed" in v3.tags["retrain.reason"]
    assert "challenger only" in out

    # 5. SIGKILL mid-training, rerun: takes over the expired lease, resumes, one version
    sc.add_shard()
    proc = sc.start(steps=120)
    out_dir = tmp_path / "out"
    known = {p.name for p in out_dir.iterdir()}
    deadline = time.monotonic() + 180
    run_dir = None
    while time.monotonic() < deadline and proc.poll() is None:
        fresh = [d for d in out_dir.iterdir() if d.name not in known and list(d.glob("step-*.json"))]
        if fresh:
            run_dir = fresh[0]
            break
        time.sleep(0.2)
    assert run_dir is not None, proc.communicate(timeout=30)[0][-4000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert sc.versions() == [1, 2, 3]
    rc, out = sc.run("retrain.lock.wait_s=30", steps=120)
    assert rc == R.EXIT_OK, out[-4000:]
    assert "took over the expired lease" in out
    assert f"resuming {run_dir.name} from" in out
    assert sc.versions() == [1, 2, 3, 4]
    assert sc.runs_named(run_dir.name) == 1  # the same MLflow run was continued
    v4 = MlflowClient(sc.uri).get_model_version(sc.model, "4")
    assert v4.tags["retrain.run_key"] == run_dir.name
