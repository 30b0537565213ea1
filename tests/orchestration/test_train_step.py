"""One optimisation step: order of operations, skipped steps, the NaN guard, clipping."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from sslstream.models.methods import Method, MethodConfig
from sslstream.orchestration.train.monitor import DataWaitClock, Monitor
from sslstream.orchestration.train.step import (
    NonFiniteLossError,
    autocast_dtype,
    check_every,
    compile_backbones,
    train_step,
    wrap_model,
)
from torch import nn


def _backbone(*layers: nn.Module, dim: int = 4) -> nn.Module:
    """A backbone as build_backbone makes them: a module with its `feature_dim`."""
    backbone = nn.Sequential(*layers)
    backbone.feature_dim = dim
    return backbone


@dataclass(frozen=True, kw_only=True)
class ProbeConfig(MethodConfig):
    scale: float = 1.0


class Probe(Method):
    """A minimal method recording what the trainer calls, and when."""

    name = "probe"
    config_class = ProbeConfig

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__(_backbone(nn.Identity()), ProbeConfig(scale=scale))
        self.w = nn.Parameter(torch.ones(3))
        self.scale = scale
        self.calls: list[tuple[str, object]] = []

    def training_step(self, views):
        v1, v2 = views
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
    out = train_step(m, m, opt, sched, scaler, [x, x], epoch=0, step=7, total_steps=10,
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
    out = train_step(m, m, opt, sched, scaler, [x, x], epoch=0, step=0, total_steps=10,
                     amp_dtype=None, grad_clip=None, stop_requested=False)
    assert not out.stepped and m.calls == []
    assert torch.equal(m.w.detach(), torch.ones(3))  # weights untouched


def test_non_finite_loss_raises_before_touching_weights():
    m = Probe()
    opt, sched = _opt(m)
    x = torch.full((2, 3, 4, 4), float("nan"))
    with pytest.raises(NonFiniteLossError, match="step 3"):
        train_step(m, m, opt, sched, torch.amp.GradScaler("cpu", enabled=False), [x, x],
                   epoch=0, step=3, total_steps=10, amp_dtype=None, grad_clip=1.0, stop_requested=False)
    assert torch.equal(m.w.detach(), torch.ones(3)) and m.calls == []


def test_gradient_clipping_bounds_the_update():
    m = Probe(scale=100.0)
    opt, sched = _opt(m)
    x = torch.ones(2, 3, 4, 4)
    out = train_step(m, m, opt, sched, torch.amp.GradScaler("cpu", enabled=False), [x, x],
                     epoch=0, step=0, total_steps=1, amp_dtype=None, grad_clip=1.0, stop_requested=True)
    assert float(out.grad_norm) == pytest.approx(200.0 * 3**0.5, rel=1e-5)  # reported before clipping
    assert torch.linalg.vector_norm(torch.ones(3) - m.w.detach()) == pytest.approx(0.1, rel=1e-5)
    assert out.stop  # a requested stop is reported after the step completes


def test_precision_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("fp16", cpu) == torch.float16 and autocast_dtype("fp32", cuda) is None
    with pytest.raises(ValueError, match="trainer.precision"):
        autocast_dtype("int8", cpu)


def test_check_steps_resolution():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert check_every("auto", cpu, 10) == 1 and check_every("auto", cuda, 10) == 10
    assert check_every(3, cuda, 10) == 3
    with pytest.raises(ValueError, match="trainer.check_every_steps"):
        check_every(0, cpu, 10)


@pytest.fixture
def no_host_reads(monkeypatch):
    """Make every way of reading a tensor's value on the host raise (a device sync on CUDA)."""
    calls = []

    def boom(name):
        def f(self, *a, **k):
            calls.append(name)
            raise AssertionError(f"host read of a tensor: Tensor.{name}")
        return f

    def arm():
        for name in ("item", "tolist", "__float__", "__bool__", "__int__"):
            monkeypatch.setattr(torch.Tensor, name, boom(name))
    return arm


def test_non_check_steps_and_non_report_updates_read_nothing_on_the_host(no_host_reads):
    """The CUDA throughput rule: between checks/reports nothing waits for the device."""
    m = Probe(scale=100.0)
    opt, sched = _opt(m)
    x = torch.ones(2, 3, 4, 4)
    mon = Monitor(every=5, total_steps=10, start_step=0, global_batch=2, is_main=True, progress="log")
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    no_host_reads()
    for k in range(4):
        out = train_step(m, m, opt, sched, scaler, [x, x], epoch=0, step=k, total_steps=10,
                         amp_dtype=None, grad_clip=1.0, stop_requested=False, check=False)
        assert mon.update(k + 1, 0, out.loss, out.metrics, 0.1, {"skipped": 0}, out.grad_norm) is None


def test_nan_between_checks_is_applied_then_caught_at_the_check():
    m = Probe()
    opt, sched = _opt(m)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    nan = torch.full((2, 3, 4, 4), float("nan"))
    out = train_step(m, m, opt, sched, scaler, [nan, nan], epoch=0, step=0, total_steps=10,
                     amp_dtype=None, grad_clip=None, stop_requested=True, check=False)
    assert not out.stop  # a stop is only agreed at check steps
    assert torch.isnan(m.w.detach()).all()  # documented: the unchecked step was applied
    with pytest.raises(NonFiniteLossError, match="step 1"):
        train_step(m, m, opt, sched, scaler, [torch.ones_like(nan), nan], epoch=0, step=1,
                   total_steps=10, amp_dtype=None, grad_clip=None, stop_requested=False, check=True)


def test_monitor_reports_window_means_rates_and_data_wait():
    import time

    mon = Monitor(every=4, total_steps=8, start_step=0, global_batch=10, is_main=False, progress="log")
    mon.reset_clock()
    losses = [1.0, 2.0, 3.0, 6.0]
    out = None
    t0 = time.perf_counter()
    for k, v in enumerate(losses):
        mon.clock.fetching()
        time.sleep(0.03)  # the "loader"
        mon.clock.ready()
        time.sleep(0.01)  # the "step"
        out = mon.update(k + 1, 0, torch.tensor(v), {"tau": torch.tensor(0.5)}, 0.2, {"skipped_bad": 3})
    wall = time.perf_counter() - t0
    assert out is not None and out["train/loss"] == pytest.approx(3.0)
    assert out["train/tau"] == 0.5 and out["data/skipped_bad"] == 3.0
    assert out["perf/img_per_s"] == pytest.approx(40 / wall, rel=0.15)
    assert out["perf/data_wait_frac"] == pytest.approx(0.12 / wall, rel=0.25)
    assert 0.6 < out["perf/data_wait_frac"] < 0.9


def test_data_wait_clock_sums_only_fetch_gaps():
    import time

    c = DataWaitClock(torch.device("cpu"))
    c.fetching()
    time.sleep(0.02)
    c.ready()
    time.sleep(0.05)  # not a fetch
    c.ready()  # a second ready without fetching adds nothing
    assert c.collect() == pytest.approx(0.02, abs=0.015) and c.collect() == 0.0


class Queued(Method):
    """A method shape with a backbone, a momentum copy and a rank-identical buffer."""

    name = "queued"

    def __init__(self) -> None:
        super().__init__(_backbone(nn.Linear(4, 4)), MethodConfig())
        self.target = nn.Sequential(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.register_buffer("queue_keys", torch.zeros(8, 4))

    @property
    def ddp_static_buffers(self) -> list[str]:
        return ["queue_keys"]

    def training_step(self, views):
        v1, v2 = views
        return self.head(self.backbone(v1)).pow(2).mean() + 0 * self.target(v2).sum(), {}


def test_ddp_skips_the_methods_static_buffers(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        m = Queued()
        ddp = wrap_model(m, torch.device("cpu"), distributed=True, compile=False)
        assert isinstance(ddp, nn.parallel.DistributedDataParallel)
        assert ddp.module is m  # DDP wraps the method itself: its forward is training_step
        assert "queue_keys" in ddp.parameters_to_ignore
        assert all(b is not m.queue_keys for b in ddp.modules_buffers)
        assert getattr(ddp, "forward_sync_buffers", getattr(ddp, "broadcast_buffers", None)) is True
        assert not ddp.find_unused_parameters
    finally:
        dist.destroy_process_group()


def test_compile_targets_the_backbones_in_place_and_keeps_state_dict_keys():
    m = Queued()
    m.target = nn.Sequential(nn.Linear(4, 4))  # same class as the backbone: the momentum copy
    keys = list(m.state_dict())
    done = compile_backbones(m, backend="eager")
    assert {id(x) for x in done} == {id(m.backbone), id(m.target)}
    assert list(m.state_dict()) == keys  # checkpoints load with or without compile
    loss, _ = m([torch.ones(2, 4), torch.ones(2, 4)])
    loss.backward()
    assert m.backbone[0].weight.grad is not None


def test_progress_bar_only_on_a_terminal_and_rank_0(monkeypatch):
    import sys

    from sslstream.orchestration.train.monitor import use_bar

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert use_bar("auto", True) and not use_bar("auto", False) and not use_bar("log", True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    assert not use_bar("auto", True) and use_bar("bar", True)
    with pytest.raises(ValueError, match="trainer.progress"):
        use_bar("fancy", True)
