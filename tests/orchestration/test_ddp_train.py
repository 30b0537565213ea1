"""Two real gloo processes train one model: equal step counts, identical weights on both
ranks, one evaluation over the gathered features, and `torchrun -m sslstream.orchestration.cli`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sslstream.orchestration.runtime import checkpoint as ckpt

from tests.ddp import free_port, run_ddp
from tests.orchestration.test_train import cli_env, tiny

TRAIN, TEST = 170, 50  # 170 over 2 ranks x batch 8: the stream pads, both ranks take 10 steps


def _overrides(tmp: Path, *extra: str) -> list[str]:
    out = tiny(tmp, f"data.generate_train_samples={TRAIN}", f"data.generate_test_samples={TEST}",
               "trainer.batch_size=8", "tracking.enabled=false", "trainer.checkpoint_every_steps=5",
               "eval.probe_epochs=3", *extra, steps=12)
    if "method=mocov2" in extra:  # MoCo has no predictor
        out = [o for o in out if not o.startswith("method.pred_hidden_dim=")]
    return out


MOCO = ("method=mocov2", "method.queue_size=64", "method.proj_output_dim=16")


def _train_rank(rank: int, world_size: int, tmp: str, extra: tuple[str, ...] = ()) -> dict:
    os.chdir(tmp)
    from sslstream.orchestration.cli import compose_config
    from sslstream.orchestration.train.loop import train

    res = train(compose_config(_overrides(Path(tmp), *extra)))
    return {
        "step": res.step,
        # parameters and buffers: BN statistics (synced from rank 0) and MoCo's queue,
        # which DDP does not sync (ddp_static_buffers): identical by construction
        "params": {k: v.detach().clone() for k, v in res.method.state_dict().items()},
        "knn": res.eval.knn_acc,
        "probe": res.eval.probe_acc,
        "bank": res.eval.bank_size,
        "test": res.eval.test_size,
    }


@pytest.mark.timeout(240)
@pytest.mark.parametrize("processes", [0, 2])  # reading in the rank; a reader + a lane process
def test_two_rank_gloo_training_keeps_ranks_identical(tmp_path, processes):
    r0, r1 = run_ddp(_train_rank, str(tmp_path), (f"trainer.loader_processes={processes}",),
                     world_size=2, timeout=200)
    assert r0["step"] == r1["step"] == 12
    assert r0["params"].keys() == r1["params"].keys()
    for k in r0["params"]:  # online network and momentum target alike
        assert torch.equal(r0["params"][k], r1["params"][k]), f"{k} differs between ranks"
    assert any("running_mean" in k for k in r0["params"])
    # evaluation saw every sample exactly once over the two ranks, and agrees on both
    assert r0["bank"] == r1["bank"] == TRAIN and r0["test"] == r1["test"] == TEST
    assert r0["knn"] == r1["knn"] and r0["probe"] == r1["probe"]
    # rank 0 wrote the checkpoints, with both ranks' RNG states
    run_dir = tmp_path / "out" / "byol-synthetic"
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["step"] == 12 and state["world_size"] == 2 and len(state["rng"]) == 2
    for k, v in r0["params"].items():
        assert torch.equal(state["model"][k], v)


@pytest.mark.timeout(180)
def test_two_rank_moco_queue_stays_identical_without_buffer_broadcast(tmp_path):
    r0, r1 = run_ddp(_train_rank, str(tmp_path), MOCO, world_size=2, timeout=160)
    assert r0["step"] == r1["step"] == 12
    from sslstream.orchestration.cli import compose_config
    from sslstream.orchestration.train.warmstart import build_method_warm

    torch.manual_seed(0)
    initial = build_method_warm(compose_config(_overrides(tmp_path, *MOCO)), None, None).state_dict()
    queues = [k for k in r0["params"] if k.startswith("queue") and k.endswith(".keys")]
    assert queues
    for k in queues:  # the queues moved (12 steps x 2 ranks x 8 keys = 3 x 64) and agree
        assert not torch.equal(r0["params"][k], initial[k]), f"{k} never enqueued"
        assert torch.equal(r0["params"][k], r1["params"][k]), f"{k} differs between ranks"
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), f"{k} differs between ranks"


@pytest.mark.timeout(180)
def test_torchrun_launches_the_cli(tmp_path):
    """The documented launch line works: torchrun sets RANK/WORLD_SIZE, the trainer joins."""
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(port),
           "-m", "sslstream.orchestration.cli", "train", *_overrides(tmp_path), "eval.at_end=false",
           "trainer.max_steps=4"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=cli_env(GLOO_SOCKET_IFNAME="lo"),
                          capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "out" / "byol-synthetic"))
    assert state["step"] == 4 and state["world_size"] == 2
