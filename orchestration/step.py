"""One optimisation step, and the pieces it is made of (precision, DDP wrapper).

Kept apart from the loop in train.py so the order of operations, which the momentum
methods depend on, is in one short place:

  forward (autocast) -> agree across ranks that the loss is finite (and whether a stop
  was requested) -> backward -> unscale + clip -> optimizer step (the grad scaler may
  skip it) -> lr scheduler step -> method.after_optimizer_step (momentum/EMA update), only
  when the optimizer really stepped (solo-learn's rule: a skipped step must not move the
  target network).
"""

from __future__ import annotations

import contextlib
import re
import signal
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, nothing is registered."""


class StepModule(nn.Module):
    """Adapter so DDP (which hooks `forward`) can drive `Method.training_step`."""

    def __init__(self, method: nn.Module) -> None:
        super().__init__()
        self.method = method

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        return self.method.training_step(view1, view2)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 (no autocast) on CPU unless asked."""
    p = str(precision).lower()
    if p == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    if p in ("bf16", "bfloat16"):
        return torch.bfloat16
    if p in ("fp16", "float16", "16"):
        return torch.float16
    if p in ("fp32", "float32", "32"):
        return None
    raise ValueError(f"trainer.precision must be auto, bf16, fp16 or fp32, got {precision!r}")


def wants_sync_bn(method: nn.Module) -> bool:
    w = getattr(method, "wants_sync_bn", False)
    return bool(w() if callable(w) else w)


def wrap_model(method: nn.Module, device: torch.device, *, distributed: bool, compile: bool) -> nn.Module:
    """StepModule (+ SyncBN when the method wants it, on CUDA) (+ DDP) (+ torch.compile).

    SyncBatchNorm does not run on CPU (NOTES.md), so CPU/gloo runs keep per-rank BN: the
    statistics are then per-rank, as in MoCo's shuffle-BN-free CPU path. The method's
    modules are converted in place, so the caller's `method` reference stays valid.
    """
    if distributed and device.type == "cuda" and wants_sync_bn(method):
        for name, child in list(method.named_children()):
            setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    model: nn.Module = StepModule(method)
    if distributed:
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=True,
        )
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


@dataclass
class StopFlag:
    """Set by SIGTERM (preemption); acted on at the next step boundary on every rank."""

    requested: bool = False
    _previous: dict[int, Any] = field(default_factory=dict)

    def install(self) -> None:
        def handler(signum: int, frame: object) -> None:
            self.requested = True

        for sig in (signal.SIGTERM,):
            # ValueError: not the main thread (train() called from a worker thread)
            with contextlib.suppress(ValueError):
                self._previous[sig] = signal.signal(sig, handler)

    def uninstall(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
        self._previous.clear()


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalar
    metrics: dict[str, Any]
    stepped: bool  # False when the grad scaler skipped the optimizer step
    stop: bool  # some rank asked to stop (SIGTERM): finish here
    grad_norm: float | None = None


def _agree(flags: list[float], device: torch.device) -> list[float]:
    """Elementwise max over ranks: one small collective per step carries every flag."""
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def train_step(
    model: nn.Module,
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    view1: torch.Tensor,
    view2: torch.Tensor,
    *,
    step: int,
    total_steps: int,
    amp_dtype: torch.dtype | None,
    grad_clip: float | None,
    stop_requested: bool,
) -> StepOutput:
    """One step. Raises NonFiniteLossError (on every rank) before touching the weights."""
    device = view1.device
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        loss, metrics = model(view1, view2)
    nonfinite, stop = _agree([0.0 if torch.isfinite(loss).item() else 1.0, float(stop_requested)], device)
    if nonfinite:
        raise NonFiniteLossError(
            f"non-finite loss at step {step} (loss={loss.item()!r} on this rank); "
            "check optim.lr / the method config; the last good checkpoint is kept"
        )
    scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, float(grad_clip)))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    stepped = scale_before is None or scaler.get_scale() >= scale_before
    if stepped:
        scheduler.step()
    else:  # the lr schedule follows the step count; torch warns about the skipped optimizer step
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            scheduler.step()
    if stepped:
        method.after_optimizer_step(step, total_steps)
    return StepOutput(loss.detach(), metrics, stepped, bool(stop), grad_norm)
