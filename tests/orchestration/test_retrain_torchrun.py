"""`sslstream retrain retrain.nproc_per_node=2`: the job stays one process and trains under
torchrun (2 gloo ranks on CPU), on a local shard folder with the local-file lease, against
a real `mlflow server` on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.retrain import job as R

from tests.orchestration.test_retrain_e2e import tiny

pytestmark = [pytest.mark.mlflow_server, pytest.mark.slow]


@pytest.mark.timeout(300)
def test_two_rank_training_under_torchrun(mlflow_server, tmp_path) -> None:
    from sslstream.pipelines.shards.synthetic import ensure_synthetic

    data = ensure_synthetic(tmp_path / "synthetic", train_samples=128, test_samples=64,
                            image_size=16, samples_per_shard=32)
    model = f"enc-{uuid.uuid4().hex[:8]}"
    argv = [sys.executable, "-m", "sslstream.orchestration.cli", "retrain",
            f"data.root={data}", "data.generate=false",
            f"tracking.uri={mlflow_server}", f"tracking.experiment={model}",
            f"tracking.registry.name={model}",
            "retrain.nproc_per_node=2", *tiny(tmp_path, 4)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=280)
    out = proc.stdout + proc.stderr
    assert proc.returncode == R.EXIT_OK, out[-5000:]
    assert "(champion)" in out
    mv = MlflowClient(mlflow_server).get_model_version(model, "1")
    key = mv.tags["retrain.run_key"]
    run = MlflowClient(mlflow_server).get_run(mv.run_id)
    assert run.data.tags["world_size"] == "2"  # trained by two ranks
    # the lease lived next to the data and was released
    assert not (data / "train" / f"_sslstream_retrain.{model}.lease").exists()
    assert list((tmp_path / "out" / key).glob("step-*.json"))  # published checkpoints
    assert not list((tmp_path / "out" / key).glob("retrain-*"))  # hand-over files elsewhere

    # running it under torchrun instead is refused with a config error, not a lease race
    env2 = dict(env, WORLD_SIZE="2", RANK="0")
    proc = subprocess.run(argv, cwd=tmp_path, env=env2, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == R.EXIT_CONFIG and "nproc_per_node" in proc.stderr


def test_torchrun_outcome_mapping() -> None:
    """A SIGTERM'd torchrun exits non-zero (its agent raises SignalException) after the ranks
    checkpointed: that is a preemption (exit 8 upstream), not a training failure."""
    from sslstream.orchestration.retrain.torchrun import outcome_of

    assert outcome_of(1, {"status": "preempted", "run_id": "r"}).status == "preempted"
    assert outcome_of(0, {"status": "completed", "run_id": "r"}).run_id == "r"
    with pytest.raises(R.RetrainExit) as e:
        outcome_of(0, {"error": "registration", "message": "server down"})
    assert e.value.code == R.EXIT_REGISTRY and "server down" in str(e.value)
    with pytest.raises(R.RetrainExit) as e:
        outcome_of(1, {})
    assert e.value.code == R.EXIT_TRAIN_FAILED and "torchrun exited with 1" in str(e.value)
    with pytest.raises(R.RetrainExit) as e:
        outcome_of(1, {"error": "train", "message": "ValueError: loss is nan"})
    assert e.value.code == R.EXIT_TRAIN_FAILED and "loss is nan" in str(e.value)
    # issue 16: a configuration error found by the ranks is a configuration error upstream
    with pytest.raises(R.RetrainExit) as e:
        outcome_of(2, {"error": "config", "message": "data.test is not set"})
    assert e.value.code == R.EXIT_CONFIG and "data.test" in str(e.value)
    # a signal in evaluation / registration: the worker reports it as preempted
    assert outcome_of(143, {"status": "preempted", "stopped_by": "SIGTERM"}).stopped_by == "SIGTERM"
