"""One optimisation step, and the pieces it is made of (precision, DDP wrapping).

The order of operations, which the momentum methods depend on, in one short place:

  forward (autocast) -> [on check steps: agree across ranks that the loss is finite and
  whether a stop was requested] -> backward -> unscale + clip -> method.after_backward
  (DINO / SwAV drop frozen heads' gradients) -> optimizer step (the fp16 grad scaler may
  skip it) -> lr scheduler step -> method.after_optimizer_step (momentum/EMA update), only
  when the optimizer really stepped (solo-learn's rule: a skipped step must not move the
  target network).

With trainer.accumulate_steps = k the forward and backward run k times on k micro-batches
of the loader's batch (DDP all-reducing in the last backward only), then everything from
the unscale on runs once: one optimizer step per loader batch, whatever k.

Host syncs: on CUDA nothing in a step waits for the device (the loss stays a device
tensor, the clip norm too), except on *check steps*. Reading `isfinite(loss)` and agreeing
on it across ranks costs a device sync plus a collective; doing that every step stalls
the CPU's lead over the GPU (the input pipeline and kernel launches stop overlapping the
previous step). So the check runs every `check_every` steps (trainer.check_every_steps,
auto: every step on CPU, where a sync is free, and every log_every_steps on CUDA). A NaN
in between is applied, poisons the weights and is caught at the next check; checkpoints
are only ever written from finite weights (loop.py), so the newest checkpoint is still
the last good state and nothing is registered. The fp16 grad scaler (not the default:
bf16 needs none) reads its scale every step, which is one more sync.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from sslstream.models.methods import Method
from sslstream.orchestration.errors import ConfigError
from torch import nn


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf: the run stops, nothing is registered."""


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
    raise ConfigError(f"trainer.precision must be auto, bf16, fp16 or fp32, got {precision!r}")


def wrap_model(
    method: Method,
    device: torch.device,
    *,
    distributed: bool,
    compile: bool,
    compile_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """The module a step calls: the method itself, or DDP around it (+ SyncBN when the
    method wants it, on CUDA) (+ torch.compile of its backbones).

    A `Method`'s `forward` is its `training_step`, so DDP (which hooks `forward`) wraps the
    method directly; its state_dict keys are the method's own.

    SyncBatchNorm does not run on CPU (in training mode it raises "expected input on GPU"),
    so CPU/gloo runs keep per-rank BN. The
    method's modules are converted in place (before DDP, which must see the final modules,
    and before the optimizer collects parameters: convert_sync_batchnorm keeps the same
    Parameter objects anyway), so the caller's `method` reference stays valid.

    torch.compile applies to the backbones only (the online one and its momentum copies:
    every submodule of the backbone's class), in place with `nn.Module.compile`, so the
    state_dict keys do not change (checkpoints stay loadable either way) and the methods'
    Python-side work (collectives with autograd, the queue's in-place enqueue, the tau
    schedule), which would only cause graph breaks, stays eager. Compiled submodules
    inside DDP keep DDP's gradient hooks on the parameters.

    DDP: find_unused_parameters=False (every method uses every trainable parameter; the
    momentum targets do not require grad), buffers synced from rank 0 on every forward
    (DDP's default: BN running statistics follow rank 0, as in the reference code) except the buffers the method
    declares identical on every rank by construction (`ddp_static_buffers`, e.g. MoCo's
    32 MB queue, which would otherwise be copied from rank 0 on every forward).
    """
    if distributed and device.type == "cuda" and method.wants_sync_bn:
        for name, child in list(method.named_children()):
            setattr(method, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
    if compile:
        compile_backbones(method, **(compile_kwargs or {}))
    model: nn.Module = method
    if distributed:
        static = method.ddp_static_buffers
        if static:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(method, static)
        model = nn.parallel.DistributedDataParallel(
            method,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=False,
            gradient_as_bucket_view=True,  # grads live in the all-reduce buckets: no copy
        )  # buffers: synced from rank 0 at every forward (DDP's default; the kwarg's name changed)
    return model


def compile_backbones(method: Method, **kwargs: Any) -> list[nn.Module]:
    """`nn.Module.compile` (in place) every submodule of the backbone's class."""
    done = [m for m in method.modules() if type(m) is type(method.backbone)]
    for m in done:
        m.compile(**kwargs)
    return done


@dataclass
class StepOutput:
    loss: torch.Tensor  # detached scalar
    metrics: dict[str, Any]
    stepped: bool  # False when the grad scaler skipped the optimizer step
    stop: bool  # some rank asked to stop (SIGINT / SIGTERM): finish here
    grad_norm: torch.Tensor | None = None  # device scalar (read it at log points only)


def check_every(spec: Any, device: torch.device, log_every: int) -> int:
    """trainer.check_every_steps: auto -> 1 on CPU (a sync is free), log_every on CUDA."""
    if spec is None or str(spec) == "auto":
        return 1 if device.type != "cuda" else max(1, int(log_every))
    n = int(spec)
    if n < 1:
        raise ConfigError(f"trainer.check_every_steps must be auto or >= 1, got {spec!r}")
    return n


def _agree(flags: list[float], device: torch.device) -> list[float]:
    """Elementwise max over ranks: one small collective per step carries every flag."""
    t = torch.tensor(flags, dtype=torch.float32, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def train_step(
    model: nn.Module,
    method: Method,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    views: Sequence[torch.Tensor],
    *,
    epoch: int,
    step: int,
    total_steps: int,
    amp_dtype: torch.dtype | None,
    grad_clip: float | None,
    stop_requested: bool,
    check: bool = True,
    accumulate_steps: int = 1,
) -> StepOutput:
    """One optimizer step of `model` (the method, or DDP around it) on one batch of `views`
    (the global crops, then the local ones; see `Method.training_step`).

    `accumulate_steps` = k > 1: the batch is cut into k equal micro-batches (the same rows
    of every view), each forwarded and backwarded with its loss divided by k, so the
    gradients add up to those of the batch's mean loss; DDP all-reduces only in the last
    micro-step's backward (`no_sync` before it). The optimizer, the lr schedule, the
    momentum targets and `after_backward` then step once. The step's loss is the mean of
    the micro-losses; metrics: 0-dim tensors averaged, `embeddings` concatenated, the rest
    the last micro-step's.

    On a check step (`check`, the same steps on every rank), raises NonFiniteLossError on
    every rank before touching the weights, and agrees on a stop."""
    device = views[0].device
    k = int(accumulate_steps)
    batch = views[0].shape[0]
    if k < 1 or batch % k:
        raise ConfigError(f"trainer.accumulate_steps={accumulate_steps} must divide the batch "
                          f"of {batch} samples", "trainer.accumulate_steps")
    micro = [list(views)] if k == 1 else [list(part) for part in
                                          zip(*(v.tensor_split(k) for v in views), strict=True)]
    optimizer.zero_grad(set_to_none=True)
    losses: list[torch.Tensor] = []
    parts: list[dict[str, Any]] = []
    stop = 0.0
    for i, mb in enumerate(micro):
        last = i == k - 1
        with _no_sync(model, not last):
            with torch.autocast(device.type, dtype=amp_dtype or torch.float32,
                                enabled=amp_dtype is not None):
                loss, metrics = model(mb)
            losses.append(loss.detach())
            parts.append(metrics)
            if last and check:
                total = torch.stack(losses).sum()
                nonfinite, stop = _agree([0.0 if torch.isfinite(total).item() else 1.0,
                                          float(stop_requested)], device)
                if nonfinite:
                    shown = total.item() if k == 1 else [x.item() for x in losses]
                    raise NonFiniteLossError(
                        f"non-finite loss at step {step} (loss={shown!r} on this rank); "
                        "check optim.lr / the method config; the last good checkpoint is kept"
                    )
            scaler.scale(loss / k if k > 1 else loss).backward()
    # the global gradient norm is logged whether or not it clips (a diverging run shows it
    # first); clipping is off unless a recipe sets trainer.grad_clip
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, float(grad_clip)).detach()
    else:
        grad_norm = (torch.nn.utils.get_total_norm([p.grad for p in params]).detach()
                     if params else None)
    method.after_backward(epoch)
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
    loss = losses[0] if k == 1 else torch.stack(losses).mean()
    return StepOutput(loss, parts[0] if k == 1 else merge_metrics(parts), stepped, bool(stop),
                      grad_norm)


def _no_sync(model: nn.Module, skip: bool) -> contextlib.AbstractContextManager:
    """DDP's `no_sync()` (gradients stay local: an accumulation micro-step before the last)
    when `skip`, else nothing."""
    if skip and isinstance(model, nn.parallel.DistributedDataParallel):
        return model.no_sync()
    return contextlib.nullcontext()


def merge_metrics(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The metrics of an accumulated step from its micro-steps': 0-dim tensors averaged,
    `embeddings` concatenated (the collapse monitors see the whole batch), anything else the
    last micro-step's."""
    out = dict(parts[-1])
    for key, value in parts[-1].items():
        if key == "embeddings":
            out[key] = torch.cat([p[key] for p in parts])
        elif isinstance(value, torch.Tensor) and value.ndim == 0:
            out[key] = torch.stack([p[key] for p in parts]).float().mean().to(value.dtype)
    return out
