"""Gradient accumulation (trainer.accumulate_steps = k): k micro-batches of B/k per optimizer
step. For a loss that is a mean over samples (BYOL, BatchNorm on fixed statistics) one step of
k x B/k is one step of 1 x B, in float64 to rounding; BatchNorm in train mode normalises each
micro-batch with its own statistics; under DDP the gradients are all-reduced once per
optimizer step (`no_sync` before the last micro-step); a k that does not divide the batch is a
config error (exit 2); a resumed accumulating run is bitwise the uninterrupted one."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from sslstream.models.methods import build_method
from sslstream.orchestration.cli import compose_config, main
from sslstream.orchestration.errors import ConfigError
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.train.step import train_step
from torch import nn

from tests.ddp import run_ddp
from tests.models.test_training_toy import TINY_BACKBONE, method_cfg

BATCH = 8
BACKBONE = {**TINY_BACKBONE, "widths": [4, 8, 8, 8]}  # float64 convolutions are slow on CPU
HEADS = {"proj_hidden_dim": 32, "proj_output_dim": 16, "pred_hidden_dim": 32}


def _byol(mode: str = "eval") -> nn.Module:
    """BYOL on the tiny ResNet in float64; `eval`: BatchNorm on its running statistics, so
    the loss is a mean of per-sample terms (nothing couples the samples of a batch)."""
    torch.manual_seed(0)
    method = build_method(method_cfg("byol", **HEADS), BACKBONE).double()
    return method.train(mode == "train")


def _views(n: int, seed: int = 42) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 12, 12, generator=g, dtype=torch.float64) for _ in range(2)]


def _step(method: nn.Module, views, k: int, model: nn.Module | None = None):
    """One train_step with plain SGD; returns (step output, gradients, weights after it)."""
    opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    out = train_step(model or method, method, opt, sched, torch.amp.GradScaler("cpu", enabled=False),
                     views, epoch=0, step=0, total_steps=10, amp_dtype=None, grad_clip=None,
                     stop_requested=False, accumulate_steps=k)
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    return out, grads, {n: t.clone() for n, t in method.state_dict().items()}


def test_byol_two_half_batches_equal_one_whole_batch_in_float64():
    """2 x B/2 == 1 x B: the loss, every gradient, and the weights after the optimizer and
    the momentum target's update, to float64 rounding."""
    views = _views(BATCH)
    one, g1, w1 = _step(_byol(), views, k=1)
    two, g2, w2 = _step(_byol(), views, k=2)
    four, g4, _ = _step(_byol(), views, k=4)
    assert g1.keys() == g2.keys() == g4.keys() and len(g1) > 10
    torch.testing.assert_close(two.loss, one.loss, rtol=1e-12, atol=1e-14)
    for name, g in g1.items():
        for other in (g2, g4):
            torch.testing.assert_close(other[name], g, rtol=1e-10, atol=1e-13, msg=name)
    for name, w in w1.items():
        torch.testing.assert_close(w2[name], w, rtol=1e-10, atol=1e-13, msg=name)
    assert max(g.abs().max() for g in g1.values()) > 1e-3  # not vacuous: real gradients
    # the collapse monitors see the whole batch's embeddings
    assert two.metrics["embeddings"].shape[0] == BATCH


def test_batchnorm_in_train_mode_normalises_each_micro_batch_alone():
    """In train mode an accumulated step is the mean of the half batches' steps, each with
    its own BatchNorm statistics (and two running-statistics updates): not the whole batch's."""
    views = _views(BATCH)
    _, g_acc, w_acc = _step(_byol("train"), views, k=2)
    _, g_one, _ = _step(_byol("train"), views, k=1)
    ref = _byol("train")
    ref.zero_grad()
    for half in range(2):
        rows = slice(half * BATCH // 2, (half + 1) * BATCH // 2)
        loss, _ = ref([v[rows] for v in views])
        (loss / 2).backward()
    for name, p in ref.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(g_acc[name], p.grad, rtol=1e-10, atol=1e-13, msg=name)
    bn = [n for n in w_acc if n.endswith("running_mean") and n.startswith("backbone")]
    state = ref.state_dict()
    assert bn and all(torch.allclose(w_acc[n], state[n], rtol=1e-12, atol=0) for n in bn)
    diff = max((g_acc[n] - g_one[n]).abs().max() / g_one[n].abs().max().clamp_min(1e-12)
               for n in g_one)
    assert diff > 1e-3, diff  # per-micro-batch statistics: a different gradient


def test_a_k_that_does_not_divide_the_batch_is_refused_by_the_step():
    with pytest.raises(ConfigError, match="trainer.accumulate_steps=3") as ei:
        _step(_byol(), _views(BATCH), k=3)
    assert ei.value.key == "trainer.accumulate_steps"


@pytest.mark.parametrize("command", ["train", "retrain"])
def test_a_k_that_does_not_divide_the_batch_exits_2(command, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "SSLSTREAM_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert main([command, "trainer.batch_size=64", "trainer.accumulate_steps=3"]) == 2
    err = capsys.readouterr().err
    assert "trainer.accumulate_steps=3" in err and "trainer.batch_size=64" in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


def _ddp_body(rank: int, world_size: int) -> dict:
    """k = 2 micro-batches per rank under DDP, counting the gradient all-reduces (DDP's comm
    hook runs once per bucket per synchronised backward)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    out = {}
    views = _views(BATCH * world_size)
    mine = [v[rank * BATCH:(rank + 1) * BATCH] for v in views]
    for k in (1, 2, 4):
        method = _byol()
        ddp = nn.parallel.DistributedDataParallel(method)
        calls: list[int] = []

        def counting(state, bucket, calls=calls):
            calls.append(1)
            return default_hooks.allreduce_hook(None, bucket)

        ddp.register_comm_hook(None, counting)
        step, grads, weights = _step(method, mine, k, model=ddp)
        out[k] = {"calls": len(calls), "loss": step.loss, "grads": grads, "weights": weights}
    return out


@pytest.mark.timeout(180)
def test_ddp_all_reduces_once_per_optimizer_step_and_equals_one_process():
    """2 ranks x (2 or 4 micro-batches of B/k): as many all-reduces as without accumulation
    (the micro-steps before the last run under `no_sync`), and the gradients and weights of
    one process on the whole 2B batch."""
    ranks = run_ddp(_ddp_body, world_size=2)
    _, g_full, w_full = _step(_byol(), _views(BATCH * 2), k=1)
    for r in ranks:
        assert r[1]["calls"] >= 1
        assert r[2]["calls"] == r[4]["calls"] == r[1]["calls"], {k: r[k]["calls"] for k in r}
        for k in (1, 2, 4):
            for name, g in g_full.items():
                torch.testing.assert_close(r[k]["grads"][name], g, rtol=1e-10, atol=1e-13,
                                           msg=f"k={k} {name}")
            for name, w in w_full.items():
                torch.testing.assert_close(r[k]["weights"][name], w, rtol=1e-10, atol=1e-13,
                                           msg=f"k={k} {name}")


@pytest.mark.timeout(300)
def test_resume_with_accumulation_is_bitwise_identical(tmp_path, monkeypatch, capsys):
    """accumulate_steps=2: a run resumed from its step-3 checkpoint (mid-epoch) ends with the
    same bits as the run that was never interrupted."""
    from sslstream.orchestration.train.loop import train

    from tests.orchestration.test_train import tiny

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    steps = 8

    def overrides(out: str) -> list[str]:
        return tiny(tmp_path, f"trainer.output_dir={tmp_path / out}", "tracking.enabled=false",
                    "eval.at_end=false", "eval.every_epochs=0", "trainer.checkpoint_every_steps=3",
                    "trainer.accumulate_steps=2", "trainer.loader_processes=0", steps=steps)

    ref = train(compose_config(overrides("ref")))
    assert ref.step == steps
    # the start line says what a step is
    assert "1 rank(s) x batch 16 (2 accumulated micro-batches of 8) = 16" in capsys.readouterr().out
    ref_dir = tmp_path / "ref" / "byol-synthetic"
    run_dir = tmp_path / "run" / "byol-synthetic"
    run_dir.mkdir(parents=True)
    shutil.copy(ref_dir / "step-00000003.pt", run_dir)
    res = train(compose_config(overrides("run")))
    assert res.step == steps
    want = ckpt.load_checkpoint(ckpt.latest_checkpoint(ref_dir))
    got = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert got["step"] == want["step"] == steps
    for key, value in want["model"].items():
        assert torch.equal(got["model"][key], value), f"model.{key} differs after resume"
    assert copy.deepcopy(got["scheduler"]) == want["scheduler"]
