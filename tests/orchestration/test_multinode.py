"""Two torchrun agents on 127.0.0.1 as two "nodes" (c10d rendezvous), each with its own
node-local data and output_dir: train, SIGKILL both mid-run, resume (every rank from rank 0's
choice), finish, register exactly once; and with one node missing the checkpoints: both
fail fast, naming the file, instead of hanging in a collective."""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from sslstream.orchestration.runtime import checkpoint as ckpt

from tests.ddp import free_port
from tests.orchestration.test_train import cli_env, tiny

STEPS = 60  # 160 samples / 2 ranks / batch 8 = 10 steps per epoch; checkpoints every 4
RUN = "byol-synthetic"


def _node_args(tmp: Path, node: int, db: str) -> list[str]:
    home = tmp / f"node{node}"
    return tiny(home, "trainer.batch_size=8", "trainer.checkpoint_every_steps=4",
                f"trainer.output_dir={home / 'out'}", f"tracking.uri={db}",
                "trainer.loader_processes=0", "eval.probe_epochs=2", steps=STEPS)


def _launch(tmp: Path, port: int, db: str) -> list[subprocess.Popen]:
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"mn{port}",
               "--max-restarts", "0", "-m", "sslstream.orchestration.cli", "train",
               *_node_args(tmp, node, db)]
        log = open(tmp / f"node{node}-{port}.log", "w")  # noqa: SIM115 - closed with the run
        procs.append(subprocess.Popen(cmd, cwd=tmp, env=cli_env(GLOO_SOCKET_IFNAME="lo"),
                                      stdout=log, stderr=subprocess.STDOUT, text=True,
                                      start_new_session=True))
    return procs


def _logs(tmp: Path, port: int) -> str:
    return "\n".join((tmp / f"node{n}-{port}.log").read_text() for n in (0, 1))


def _kill(procs) -> None:
    """A node dies: the agent and its workers (torchrun starts them in their own sessions)."""
    import psutil

    for p in procs:
        try:
            family = [*psutil.Process(p.pid).children(recursive=True), psutil.Process(p.pid)]
        except psutil.NoSuchProcess:
            continue
        for q in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                q.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(30)


def _wait(procs, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.2)
    codes = [p.poll() for p in procs]
    _kill(procs)
    return codes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_nodes_train_kill_resume_register_once_and_missing_checkpoint(tmp_path):
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    dirs = [tmp_path / f"node{n}" / "out" / RUN for n in (0, 1)]
    # 1. train until both nodes hold a mid-run checkpoint, then SIGKILL everything
    port = free_port()
    procs = _launch(tmp_path, port, db)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        steps = [ckpt.latest_checkpoint(d) for d in dirs]
        if all(s is not None and s.step >= 8 for s in steps):
            break
        assert not any(s is not None and s.step == STEPS for s in steps)
        assert all(p.poll() is None for p in procs), _logs(tmp_path, port)[-4000:]
        time.sleep(0.1)
    else:
        _kill(procs)
        raise AssertionError("no checkpoint on both nodes:\n" + _logs(tmp_path, port)[-4000:])
    _kill(procs)
    saved = [ckpt.latest_checkpoint(d).name for d in dirs]
    assert ckpt.latest_checkpoint(dirs[0]).step < STEPS

    # 2. one node lost its checkpoints: both agents fail fast, the file is named
    aside = tmp_path / "aside"
    shutil.move(str(dirs[1]), aside)
    dirs[1].mkdir()
    port = free_port()
    t0 = time.monotonic()
    codes = _wait(_launch(tmp_path, port, db), timeout=150)
    out = _logs(tmp_path, port)
    assert all(c not in (None, 0) for c in codes), (codes, out[-4000:])
    assert time.monotonic() - t0 < 150
    lacking = str(dirs[1] / saved[0])
    assert f"{lacking} does not exist on this node" in out, out[-4000:]   # the rank without it
    assert f"lack(s) {saved[0]}" in out, out[-4000:]                       # the one with it
    shutil.rmtree(dirs[1])
    shutil.move(str(aside), dirs[1])

    # 3. resume on both nodes from rank 0's choice, finish, register once
    port = free_port()
    codes = _wait(_launch(tmp_path, port, db), timeout=300)
    out = _logs(tmp_path, port)
    assert codes == [0, 0], out[-4000:]
    assert "resuming" in out and "registered model" in out
    for d in dirs:  # every node's local rank 0 wrote the final state
        assert ckpt.load_checkpoint(ckpt.latest_checkpoint(d))["step"] == STEPS
    client = MlflowClient(db)
    versions = client.search_model_versions("name='sslstream-encoder'")
    assert len(versions) == 1
    assert len(client.search_runs([client.get_experiment_by_name("sslstream").experiment_id])) == 1
