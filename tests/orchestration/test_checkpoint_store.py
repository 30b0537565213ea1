"""Checkpoints in object stores (moto S3 and the GCS fake on 127.0.0.1, nothing mocked in the
clients): publish / keep-last-K / load, SIGKILL during an upload, the background uploader
(snapshots, a bounded queue, a store failing mid-run), and the run-level checks: an s3://
output_dir is the bucket (not a local folder named `s3:`), an unreachable or refused store
fails before the first step with the URL named and its credentials masked, a checkpoint of
another method or world size is refused with the difference named."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from sslstream.orchestration.cli import main
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime.runstore import RunStore
from sslstream.orchestration.runtime.uploader import CheckpointUploader
from sslstream.pipelines.shards.storage import RetryPolicy

from tests.fixtures.gcs import GCS_OPTIONS, FakeGCS
from tests.fixtures.s3 import CREDS, FaultProxy, S3Env
from tests.orchestration.test_train import cli_env, tiny

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(params=["s3", "gs"])
def remote(request) -> tuple[str, dict, dict]:
    """(run folder URL, storage options, environment for a subprocess) on S3 or GCS."""
    if request.param == "s3":
        s3: S3Env = request.getfixturevalue("s3")
        s3.bucket("ckpt")
        env = {**CREDS, "AWS_ENDPOINT_URL": s3.endpoint}
        return "s3://ckpt/runs/r1", dict(s3.storage_options), env
    gcs: FakeGCS = request.getfixturevalue("gcs")
    gcs.buckets.add("ckpt")
    env = {"STORAGE_EMULATOR_HOST": gcs.endpoint, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    return "gs://ckpt/runs/r1", dict(GCS_OPTIONS), env


def test_publish_keep_last_and_load_on_an_object_store(remote):
    url, opts, _ = remote
    store = RunStore(url, opts)
    for step in (1, 2, 10, 3):
        ckpt.save_checkpoint({"step": step, "w": torch.full((3,), float(step))}, store, step,
                             keep_last=2, meta={"run_name": "r1"})
    assert [c.step for c in ckpt.list_checkpoints(url, opts)] == [3, 10]
    assert sorted(store.names()) == ["step-00000003.json", "step-00000003.pt",
                                     "step-00000010.json", "step-00000010.pt"]
    latest = ckpt.latest_checkpoint(url, opts)
    assert latest.url == f"{url}/step-00000010.pt" and latest.manifest()["run_name"] == "r1"
    assert torch.equal(ckpt.load_checkpoint(latest)["w"], torch.full((3,), 10.0))
    # a URL loads as it is (trainer.init_from, sslstream eval --checkpoint)
    assert ckpt.load_checkpoint(f"{url}/step-00000003.pt", storage_options=opts)["step"] == 3


_KILLED_UPLOAD = """
import json, sys, time, torch
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime.runstore import RunStore
url, opts = sys.argv[1], json.loads(sys.argv[2])
store = RunStore(url, opts)
ckpt.save_checkpoint({"w": torch.ones(10)}, store, step=1)
write = RunStore.write_bytes
def stalled(self, name, data):  # the state object is uploaded; its manifest never is
    if name == ckpt.manifest_name(2):
        print("uploading", flush=True)
        time.sleep(600)
    write(self, name, data)
RunStore.write_bytes = stalled
ckpt.save_checkpoint({"w": torch.zeros(200_000)}, store, step=2)
"""


@pytest.mark.timeout(120)
def test_sigkill_during_an_upload_leaves_the_previous_checkpoint_loadable(remote):
    url, opts, env = remote
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_UPLOAD, url, json.dumps(opts)],
                            cwd=REPO, stdout=subprocess.PIPE, text=True, env=cli_env(**env))
    assert proc.stdout.readline().strip() == "uploading", proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    store = RunStore(url, opts)
    assert "step-00000002.pt" in store.names()  # the whole state object is there ...
    latest = ckpt.latest_checkpoint(store)  # ... but never published
    assert latest.step == 1 and torch.equal(ckpt.load_checkpoint(latest)["w"], torch.ones(10))
    removed, size = ckpt.remove_unpublished(store)  # what the next run does first
    assert removed == 1 and size > 800_000
    assert sorted(store.names()) == ["step-00000001.json", "step-00000001.pt"]


def _gate_publish(monkeypatch) -> tuple[threading.Event, threading.Event]:
    """Hold the uploader's first publish until `release` is set; `started` says it began."""
    started, release = threading.Event(), threading.Event()
    real = ckpt.publish

    def held(*a, **k):
        if not started.is_set():
            started.set()
            assert release.wait(30)
        return real(*a, **k)

    monkeypatch.setattr(ckpt, "publish", held)
    return started, release


def test_uploader_snapshots_at_submit_and_keeps_only_the_newest_waiting(tmp_path, monkeypatch):
    """The step only copies the state: submit returns while an upload is stuck, later changes
    to the live tensors do not leak into a queued checkpoint, and a newer snapshot replaces
    a waiting one (one upload in flight, at most one waiting)."""
    started, release = _gate_publish(monkeypatch)
    up = CheckpointUploader(RunStore(tmp_path), keep_last=5)
    w = torch.zeros(4)
    up.submit(1, {"w": w}, {})
    assert started.wait(30)  # step 1 is uploading (held)
    w += 1  # the next optimizer step changes the live weights in place
    up.submit(2, {"w": w}, {})
    w += 1
    up.submit(3, {"w": w}, {})  # step 2 never began: replaced
    assert not up.flush(timeout_s=0.2)  # still held
    release.set()
    assert up.close()
    assert up.published == 3
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1, 3]
    assert torch.equal(ckpt.load_checkpoint(ckpt.list_checkpoints(tmp_path)[0])["w"],
                       torch.zeros(4))
    assert torch.equal(ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["w"],
                       torch.full((4,), 2.0))


def test_a_store_failing_mid_run_is_retried_and_the_previous_checkpoint_stays(
        s3: S3Env, fault_proxy: FaultProxy, monkeypatch):
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)  # count our retries, not s3fs's
    s3.bucket("ckpt")
    opts = {"client_kwargs": {"endpoint_url": fault_proxy.endpoint}, "skip_instance_cache": True,
            "config_kwargs": {"retries": {"max_attempts": 1}}}
    store = RunStore("s3://ckpt/runs/r1", opts, policy=RetryPolicy(attempts=4, base_delay=0.01))
    up = CheckpointUploader(store, keep_last=3)
    # transient faults on every object of step 1: retried, published
    fault_proxy.only, fault_proxy.plan = "PUT", ["503", "reset", "503"]
    up.submit(1, {"w": torch.ones(3)}, {})
    assert up.flush() and up.published == 1
    assert fault_proxy.injected == ["PUT:503", "PUT:reset", "PUT:503"]
    # an outage longer than the retries while step 2 uploads: dropped, training goes on
    fault_proxy.match, fault_proxy.plan = "step-00000002", ["503"] * 50
    up.submit(2, {"w": torch.full((3,), 2.0)}, {})
    assert not up.flush()
    assert 2 in up.failed and "gave up after 4 attempts" in up.failed[2]
    assert ckpt.latest_checkpoint(store).step == 1  # still the one to resume from
    # the store is back: the next checkpoint lands
    fault_proxy.plan = []
    up.submit(3, {"w": torch.full((3,), 3.0)}, {})
    assert up.close() and up.published == 3
    assert [c.step for c in ckpt.list_checkpoints(store)] == [1, 3]


# --- runs ----------------------------------------------------------------------------------


def _train(tmp: Path, *extra: str, steps: int = 4) -> int:
    return main(["train", *tiny(tmp, "eval.at_end=false", "tracking.enabled=false", *extra,
                                steps=steps)])


@pytest.mark.timeout(300)
def test_an_s3_output_dir_is_the_bucket_and_the_run_resumes_from_it(s3: S3Env, tmp_path,
                                                                   monkeypatch, capsys, caplog):
    """`trainer.output_dir=s3://ckpt/runs` used to write a local folder named `s3:`. Now the
    checkpoints, their manifests and the registered marker are in the bucket, the run
    resumes from there, a rerun of a finished run reads the marker there, and a new run can
    warm-start from a checkpoint there."""
    s3.bucket("ckpt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["train", *tiny(tmp_path, "trainer.output_dir=s3://ckpt/runs", f"tracking.uri={uri}",
                           "eval.probe=false", steps=4)]
    assert main(args) == 0
    assert not (tmp_path / "s3:").exists() and not list(tmp_path.glob("s3*"))
    assert sorted(s3.fs().ls("ckpt/runs/byol-synthetic")) == [
        f"ckpt/runs/byol-synthetic/{n}" for n in ("registered.json", "step-00000004.json",
                                                  "step-00000004.pt")]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint("s3://ckpt/runs/byol-synthetic"))
    assert state["step"] == 4 and state["world_size"] == 1
    capsys.readouterr()
    # the same command again: finished and registered, nothing to do (the marker is read)
    assert main(args) == 0
    assert "already finished at step 4 and was registered" in capsys.readouterr().out
    # a longer run of the same name resumes from the bucket
    longer = [a if not a.startswith("trainer.max_steps=") else "trainer.max_steps=6"
              for a in args]
    assert main(longer) == 0
    assert "resuming byol-synthetic from s3://ckpt/runs/byol-synthetic/step-00000004.pt" \
        in capsys.readouterr().out
    assert ckpt.latest_checkpoint("s3://ckpt/runs/byol-synthetic").step == 6
    # a new run warm-started from a checkpoint in the bucket (trainer.init_from=s3://...)
    import logging

    caplog.set_level(logging.INFO, logger="sslstream.train")
    assert _train(tmp_path, "trainer.output_dir=s3://ckpt/runs", "run_name=warm",
                  "trainer.init_from=s3://ckpt/runs/byol-synthetic/step-00000006.pt",
                  steps=1) == 0
    assert ("warm start: backbone weights from s3://ckpt/runs/byol-synthetic/step-00000006.pt"
            in caplog.text)


@pytest.mark.timeout(300)
def test_a_store_that_fails_mid_run_costs_a_checkpoint_not_the_run(
        s3: S3Env, fault_proxy: FaultProxy, tmp_path, monkeypatch, caplog):
    import logging

    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    s3.bucket("ckpt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", fault_proxy.endpoint)
    monkeypatch.chdir(tmp_path)
    fault_proxy.only, fault_proxy.match = "PUT", "step-00000004"
    fault_proxy.plan = ["503", "reset"] * 40  # longer than the uploader's retries
    caplog.set_level(logging.INFO, logger="sslstream.train")
    assert _train(tmp_path, "trainer.output_dir=s3://ckpt/runs",
                  "trainer.checkpoint_every_steps=2",
                  "trainer.storage_options={config_kwargs:{retries:{max_attempts:1}}}",
                  steps=8) == 0
    assert "checkpoint of step 4 was not written to s3://ckpt/runs/byol-synthetic" in caplog.text
    steps = [c.step for c in ckpt.list_checkpoints("s3://ckpt/runs/byol-synthetic")]
    assert 4 not in steps and steps[-1] == 8


def test_an_unreachable_or_refused_store_fails_before_the_first_step(s3: S3Env, tmp_path,
                                                                     monkeypatch, capsys):
    s3.bucket("ckpt")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    s3.set_auth(True)  # our keys are not moto's: every request is refused
    assert _train(tmp_path, "trainer.output_dir=s3://ckpt/runs") == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoints to s3://ckpt/runs/byol-synthetic" in err
    assert "access denied" in err and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # before the data set was even generated
    s3.set_auth(False)

    from tests.ddp import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    assert _train(tmp_path, "trainer.output_dir=s3://ckpt/runs",
                  "trainer.storage_options={config_kwargs:{retries:{max_attempts:1}}}") == 1
    err = capsys.readouterr().err
    assert "cannot write checkpoints to s3://ckpt/runs/byol-synthetic" in err
    assert "gave up after 3 attempts" in err and not (tmp_path / "data").exists()


def test_credentials_in_a_store_url_are_masked():
    store = RunStore("s3://AKIAEXAMPLE:topsecret@ckpt/runs", {})
    assert "topsecret" not in store.url and "topsecret" not in repr(store)


@pytest.mark.timeout(300)
def test_a_checkpoint_of_another_method_or_world_size_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert _train(tmp_path, "run_name=r", steps=2) == 0
    capsys.readouterr()
    run_dir = tmp_path / "out" / "r"
    # another method under the same run name: refused before the model is built
    assert _train(tmp_path, "run_name=r", "method=simsiam", steps=4) == 1
    err = capsys.readouterr().err
    assert f"checkpoint {run_dir}/step-00000002.pt was written by another run or config" in err
    assert "method.name=byol (this run: simsiam)" in err
    # the same method with another projector: named too
    assert _train(tmp_path, "run_name=r", "method.proj_output_dim=16", steps=4) == 1
    assert "method.proj_output_dim=32 (this run: 16)" in capsys.readouterr().err
    # written by 2 ranks: refused on 1 (the cursors are per rank), the choices named
    manifest = run_dir / "step-00000002.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "world_size": 2, "global_batch": 32}))
    assert _train(tmp_path, "run_name=r", steps=4) == 1
    err = capsys.readouterr().err
    assert "was written by 2 rank(s) (global batch 32); this run has 1 rank(s)" in err
    assert "resume it on 2 rank(s), or start a new run" in err
