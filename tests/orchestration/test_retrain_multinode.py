"""`sslstream retrain` as a multi-node job: two launcher agents on 127.0.0.1 as two "nodes"
(c10d rendezvous, one rank each), checkpoints in moto S3 (no shared run folder), the model
registry in one sqlite store. Rank 0 alone snapshots, reads the registry and takes the lease;
both ranks train; one version is registered and promoted; both agents exit 0. Run again:
nothing new, both exit 0, nothing trained."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.runtime import checkpoint as ckpt

from tests.ddp import free_port
from tests.fixtures.s3 import CREDS
from tests.orchestration.test_multinode import _kill
from tests.orchestration.test_retrain_e2e import tiny
from tests.orchestration.test_train import cli_env

pytestmark = [pytest.mark.slow, pytest.mark.s3]


def _launch(tmp: Path, port: int, argv: list[str], env: dict, tag: str) -> list[subprocess.Popen]:
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "sslstream.orchestration.runtime.launch", "--nnodes=2",
               "--nproc-per-node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
               f"--rdzv-id=rt{port}", "--max-restarts=0", "-m", "sslstream", "retrain", *argv]
        log = open(tmp / f"{tag}-node{node}.log", "w")  # noqa: SIM115 - closed with the run
        procs.append(subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def _wait(procs: list[subprocess.Popen], timeout: float) -> list[int | None]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.5)
    codes = [p.poll() for p in procs]
    _kill(procs)
    return codes


def _logs(tmp: Path, tag: str) -> list[str]:
    return [(tmp / f"{tag}-node{n}.log").read_text() for n in (0, 1)]


@pytest.mark.timeout(600)
def test_two_node_retrain_takes_the_lease_once_and_registers_once(s3, tmp_path):
    from sslstream.pipelines.shards.synthetic import ensure_synthetic

    data = ensure_synthetic(tmp_path / "synthetic", train_samples=128, test_samples=64,
                            image_size=16, samples_per_shard=32)
    s3.bucket("ckpt")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    model = "enc-multinode"
    argv = ["data=shards", f"data.train={data / 'train'}", f"data.test={data / 'test'}",
            "data.num_classes=10", f"tracking.uri={db}", f"tracking.experiment={model}",
            f"tracking.registry.name={model}", *tiny(tmp_path, 6),
            "trainer.output_dir=s3://ckpt/runs", "trainer.loader_processes=0"]
    env = cli_env(**CREDS, AWS_ENDPOINT_URL=s3.endpoint, GLOO_SOCKET_IFNAME="lo")

    codes = _wait(_launch(tmp_path, free_port(), argv, env, "first"), timeout=420)
    logs = _logs(tmp_path, "first")
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    both = "\n".join(logs)
    # rank 0 alone decided (one agent's worker prints the decision lines) and held the lease
    assert len(re.findall(r"sslstream retrain: .*training run ", both)) == 1, both[-4000:]
    assert len(re.findall(r"sslstream retrain: source ", both)) == 1
    assert not list((data / "train").glob("_sslstream_retrain.*.lease"))  # released
    client = MlflowClient(db)
    versions = client.search_model_versions(f"name='{model}'")
    assert len(versions) == 1  # one registration ...
    mv = versions[0]
    assert client.get_model_version_by_alias(model, "champion").version == mv.version  # ... promoted
    assert client.get_run(mv.run_id).data.tags["world_size"] == "2"  # trained by both ranks
    key = mv.tags["retrain.run_key"]
    last = ckpt.latest_checkpoint(f"s3://ckpt/runs/{key}", s3.storage_options)  # the store
    assert last is not None and last.step == 6 and last.manifest()["world_size"] == 2

    # again: nothing new since the champion's snapshot; every rank exits 0, none trains
    codes = _wait(_launch(tmp_path, free_port(), argv, env, "second"), timeout=240)
    logs = _logs(tmp_path, "second")
    assert codes == [0, 0], "\n".join(x[-3000:] for x in logs)
    assert "nothing to do" in "\n".join(logs)
    assert len(client.search_model_versions(f"name='{model}'")) == 1
