"""One optimisation step: order of operations, skipped steps, the NaN guard, clipping."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from orchestration.step import NonFiniteLossError, StepModule, autocast_dtype, train_step


class Probe(nn.Module):
    """A minimal method recording what the trainer calls, and when."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(3))
        self.scale = scale
        self.calls: list[tuple[str, object]] = []

    def training_step(self, v1, v2):
        loss = ((self.w * v1.mean()) ** 2).sum() * self.scale + 0 * v2.sum()
        return loss, {"embeddings": v1.flatten(1), "tau": 0.5}

    def after_optimizer_step(self, step, total_steps):
        self.calls.append(("after", (step, total_steps, self.w.detach().clone())))


def _opt(m):
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    return opt, sched


def test_momentum_update_sees_the_stepped_weights_and_the_step_index():
    m = Probe()
    opt, sched = _opt(m)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    x = torch.ones(2, 3, 4, 4)
    out = train_step(StepModule(m), m, opt, sched, scaler, x, x, step=7, total_steps=10,
                     amp_dtype=None, grad_clip=None, stop_requested=False)
    assert out.stepped and not out.stop
    (name, (step, total, w_seen)), = m.calls
    assert (name, step, total) == ("after", 7, 10)
    # the update ran after the optimizer: it saw w - lr * grad (grad = 2 w x^2 = 2)
    assert torch.allclose(w_seen, torch.full((3,), 1.0 - 0.1 * 2.0))


def test_skipped_step_does_not_move_the_target():
    m = Probe(scale=1e36)  # finite loss, but x 2^16 the scaled gradients overflow: the scaler skips the step
    opt, sched = _opt(m)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    x = torch.ones(2, 3, 4, 4)
    out = train_step(StepModule(m), m, opt, sched, scaler, x, x, step=0, total_steps=10,
                     amp_dtype=None, grad_clip=None, stop_requested=False)
    assert not out.stepped and m.calls == []
    assert torch.equal(m.w.detach(), torch.ones(3))  # weights untouched


def test_non_finite_loss_raises_before_touching_weights():
    m = Probe()
    opt, sched = _opt(m)
    x = torch.full((2, 3, 4, 4), float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train_step(StepModule(m), m, opt, sched, torch.amp.GradScaler("cpu", enabled=False), x, x,
                   step=3, total_steps=10, amp_dtype=None, grad_clip=1.0, stop_requested=False)
    assert torch.equal(m.w.detach(), torch.ones(3)) and m.calls == []


def test_gradient_clipping_bounds_the_update():
    m = Probe(scale=100.0)
    opt, sched = _opt(m)
    x = torch.ones(2, 3, 4, 4)
    out = train_step(StepModule(m), m, opt, sched, torch.amp.GradScaler("cpu", enabled=False), x, x,
                     step=0, total_steps=1, amp_dtype=None, grad_clip=1.0, stop_requested=True)
    assert out.grad_norm == pytest.approx(200.0 * 3**0.5, rel=1e-5)  # reported before clipping
    assert torch.linalg.vector_norm(torch.ones(3) - m.w.detach()) == pytest.approx(0.1, rel=1e-5)
    assert out.stop  # a requested stop is reported after the step completes


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16 and autocast_dtype("fp32", cuda) is None
    with pytest.raises(ValueError, match="trainer.precision"):
        autocast_dtype("int8", cpu)
