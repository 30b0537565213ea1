"""Checkpoints on the local file system: publish (state, then manifest), keep-last-K,
weights_only loads, exact RNG round trips, what a killed writer leaves. The same on object
stores, the uploader and the run-level checks are in test_checkpoint_store.py."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from sslstream.orchestration.runtime import checkpoint as ckpt


def test_save_keeps_last_k_and_latest_by_step(tmp_path):
    for step in (5, 10, 100, 7):
        ckpt.save_checkpoint({"step": step, "w": torch.full((2,), float(step))}, tmp_path, step, keep_last=3)
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    # ordered by step number (not name length or mtime); the oldest (5) pruned
    assert names == ["step-00000007.pt", "step-00000010.pt", "step-00000100.pt"]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000100.pt"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert state["step"] == 100 and torch.equal(state["w"], torch.full((2,), 100.0))
    assert not list(tmp_path.glob(".tmp-*")), "temporary files must not survive a save"
    # the pruned checkpoint went with its manifest; each kept one has its own
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "step-00000007.json", "step-00000007.pt", "step-00000010.json", "step-00000010.pt",
        "step-00000100.json", "step-00000100.pt"]


def test_only_published_checkpoints_are_listed_and_a_damaged_one_is_refused(tmp_path):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1)
    ckpt.save_checkpoint({"step": 2}, tmp_path, 2)
    # a state object whose manifest was never written (the writer died between the two)
    (tmp_path / "step-00000003.pt").write_bytes((tmp_path / "step-00000002.pt").read_bytes())
    assert [c.step for c in ckpt.list_checkpoints(tmp_path)] == [1, 2]
    # a state object that is not the one its manifest published
    (tmp_path / "step-00000002.pt").write_bytes((tmp_path / "step-00000001.pt").read_bytes())
    with pytest.raises(OSError, match=r"step-00000002.pt does not match its manifest"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))
    assert ckpt.remove_unpublished(tmp_path)[0] == 1
    assert not (tmp_path / "step-00000003.pt").exists()


def test_failed_write_leaves_previous_checkpoints_intact(tmp_path):
    ckpt.save_checkpoint({"step": 1}, tmp_path, 1)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        ckpt.save_checkpoint({"bad": Unpicklable()}, tmp_path, 2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step-00000001.pt"]
    assert not list(tmp_path.glob(".tmp-*"))


def test_loads_are_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "step-00000001.pt"
    torch.save({"x": Evil()}, path)
    with pytest.raises(RuntimeError, match="step-00000001.pt"):
        ckpt.load_checkpoint(path)


def test_rng_state_round_trip_is_exact_and_weights_only_safe(tmp_path):
    torch.manual_seed(3)
    random.seed(4)
    np.random.seed(5)
    random.gauss(0, 1)  # leaves a cached gaussian in python's state
    np.random.standard_normal()  # and numpy's
    state = ckpt.rng_state()
    ckpt.save_checkpoint({"rng": state}, tmp_path, 1)
    expected = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "step-00000001.pt")["rng"])
    got = (torch.rand(4), random.random(), random.gauss(0, 1), np.random.rand(3), np.random.standard_normal())
    assert torch.equal(expected[0], got[0])
    assert expected[1] == got[1] and expected[2] == got[2]
    assert np.array_equal(expected[3], got[3]) and expected[4] == got[4]


def test_to_plain_converts_numpy_for_weights_only(tmp_path):
    cursor = {"epoch": np.int64(3), "order": np.arange(4), "pos": (np.int32(1), 2), "name": "x"}
    plain = ckpt.to_plain(cursor)
    ckpt.save_checkpoint({"loader": plain}, tmp_path, 1)
    back = ckpt.load_checkpoint(tmp_path / "step-00000001.pt")["loader"]
    assert back["epoch"] == 3 and type(back["epoch"]) is int
    assert torch.equal(back["order"], torch.arange(4))
    assert back["pos"] == (1, 2) and back["name"] == "x"


_KILLED_WRITER = """
import os, sys, time, torch
from sslstream.orchestration.runtime import checkpoint as ckpt
ckpt.save_checkpoint({"w": torch.ones(10)}, sys.argv[1], step=3)
def stall(fd):  # the state's bytes are written; the process dies before the rename
    print("writing", flush=True)
    time.sleep(600)
os.fsync = stall
ckpt.save_checkpoint({"w": torch.zeros(250_000)}, sys.argv[1], step=7)
"""


@pytest.mark.timeout(120)
def test_sigkill_mid_write_leaves_litter_that_the_next_run_removes(tmp_path, capsys, caplog):
    import logging
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from sslstream.orchestration.cli import main

    from tests.orchestration.test_train import tiny

    repo = Path(__file__).resolve().parents[2]
    run_dir = tmp_path / "out" / "byol-synthetic"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(run_dir)], cwd=repo,
                            stdout=subprocess.PIPE, text=True,
                            env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    litter = [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    assert len(litter) == 1 and litter[0].stat().st_size > 1_000_000
    assert ckpt.latest_checkpoint(run_dir).step == 3  # the previous one still loads
    assert torch.equal(ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["w"], torch.ones(10))
    for p in ckpt.list_checkpoints(run_dir):
        p.store.delete(ckpt.manifest_name(p.step))  # a new run's folder, apart from the litter

    caplog.set_level(logging.INFO, logger="sslstream.train")
    import os

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert main(["train", *tiny(tmp_path, "eval.at_end=false", "tracking.enabled=false",
                                    steps=2)]) == 0
    finally:
        os.chdir(cwd)
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".tmp-")]
    assert ckpt.latest_checkpoint(run_dir).name == "step-00000002.pt"
    assert not (run_dir / "step-00000003.pt").exists()  # unpublished once its manifest went
    assert "removed 2 unpublished checkpoint file(s)" in caplog.text
