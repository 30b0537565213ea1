"""Preemption and resume: SIGTERM -> checkpoint + exit 143; SIGKILL mid-epoch -> resume ->
bitwise the same weights as a run that was never interrupted (CPU, one thread)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sslstream.orchestration.cli import compose_config
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.train.loop import train

from tests.orchestration.test_train import cli_env, tiny

STEPS = 40  # 160 samples / batch 16 = 10 steps per epoch; checkpoints every 3 (mostly mid-epoch)


def overrides(tmp: Path, out: str) -> list[str]:
    return tiny(tmp, f"trainer.output_dir={tmp / out}", "tracking.enabled=false",
                "eval.at_end=false", "trainer.checkpoint_every_steps=3", steps=STEPS)


def wait_for_checkpoint(run_dir: Path, proc: subprocess.Popen, after_step: int, timeout: float = 90) -> int:
    """Poll (bounded) until a checkpoint past `after_step` exists; return its step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = ckpt.latest_checkpoint(run_dir)
        if last is not None and last.step > after_step:
            return last.step
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no checkpoint after step {after_step} in {timeout}s")


def start(tmp: Path, out: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sslstream.orchestration.cli", "train", *overrides(tmp, out)],
        cwd=tmp, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def final_state(run_dir: Path) -> dict:
    last = ckpt.latest_checkpoint(run_dir)
    assert last is not None and last.name == f"step-{STEPS:08d}.pt"
    return ckpt.load_checkpoint(last)


@pytest.mark.timeout(300)
def test_sigterm_then_sigkill_then_resume_is_bitwise_identical(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    # the reference: never interrupted (in-process; generates the shared data set)
    ref = train(compose_config(overrides(tmp_path, "ref")))
    assert ref.step == STEPS and ref.status == "completed"
    expected = final_state(tmp_path / "ref" / "byol-synthetic")

    run_dir = tmp_path / "run" / "byol-synthetic"
    # 1) SIGTERM after the first checkpoint: checkpoint at the next step boundary, exit 143
    proc = start(tmp_path, "run")
    first = wait_for_checkpoint(run_dir, proc, 0)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]  # 128 + SIGTERM: stopped, resumable
    assert "stopped by SIGTERM at step" in out
    stopped = ckpt.latest_checkpoint(run_dir).step
    assert first <= stopped < STEPS

    # 2) resume, then SIGKILL (no chance to clean up) after a later, mid-epoch checkpoint
    proc = start(tmp_path, "run")
    killed_after = wait_for_checkpoint(run_dir, proc, stopped)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert "resuming byol-synthetic from" in out and f"(step {stopped}/{STEPS})" in out
    assert killed_after < STEPS
    for p in ckpt.list_checkpoints(run_dir):
        ckpt.load_checkpoint(p)  # every checkpoint on disk is complete

    # 3) resume to the end: the same bits as the uninterrupted run
    res = train(compose_config(overrides(tmp_path, "run")))
    assert res.step == STEPS
    got = final_state(run_dir)
    assert got["step"] == expected["step"] and got["epoch"] == expected["epoch"]
    assert got["model"].keys() == expected["model"].keys()
    for k, v in expected["model"].items():
        assert torch.equal(got["model"][k], v), f"model.{k} differs after resume"
    for a, b in zip(got["optimizer"]["state"].values(), expected["optimizer"]["state"].values(), strict=True):
        for k in a:
            assert torch.equal(a[k], b[k]), f"optimizer state {k} differs after resume"
    assert got["scheduler"] == expected["scheduler"]
