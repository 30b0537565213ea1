"""The ``Method`` base class: backbone + heads + objective + state behind one step interface.

A method is an ``nn.Module`` so that everything it carries (online and momentum networks,
EMA step, queue and pointer) is in ``state_dict()``. The trainer only needs:

* ``training_step(view1, view2) -> (loss, metrics)``: ``metrics`` holds detached scalars
  and ``"embeddings"``, a detached (B, D) batch for the collapse monitors;
* ``after_optimizer_step(step, total_steps)``: called once per *real* optimizer step;
* ``parameter_groups()``: optimiser groups carrying ``lars_exclude`` / ``fixed_lr`` flags;
* ``embed(x)``: backbone features for evaluation;
* ``wants_sync_bn``: convert BN to SyncBatchNorm (CUDA + DDP only; the trainer does it).

``forward`` is ``training_step``, so the method can be wrapped in DDP directly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from models.backbones import feature_dim_of

__all__ = ["CheckpointMismatchError", "Method", "MethodConfig", "split_param_groups"]

Metrics = dict[str, Any]


class MethodConfig:
    """Read ``method.*`` keys with errors that name the missing or bad key."""

    def __init__(self, cfg: Mapping[str, Any] | Any, method: str) -> None:
        self._cfg = cfg
        self._method = method

    def _raw(self, key: str) -> Any:
        getter = getattr(self._cfg, "get", None)
        return getter(key, None) if getter is not None else getattr(self._cfg, key, None)

    def req(self, key: str) -> Any:
        value = self._raw(key)
        if value is None:
            raise ValueError(f"method.{key} is missing (method {self._method!r})")
        return value

    def opt(self, key: str, default: Any) -> Any:
        value = self._raw(key)
        return default if value is None else value

    def int(self, key: str) -> int:
        return int(self.req(key))

    def float(self, key: str) -> float:
        return float(self.req(key))

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = str(self.opt(key, default)).lower()
        if value not in allowed:
            raise ValueError(
                f"method.{key} must be one of {', '.join(allowed)}, got {value!r} "
                f"(method {self._method!r})"
            )
        return value


def split_param_groups(named: Iterable[tuple[str, nn.Parameter]], name: str,
                       **flags: Any) -> list[dict[str, Any]]:
    """Split trainable parameters into weights and biases/norm parameters (``ndim <= 1``).

    The second group is flagged ``lars_exclude``: LARS neither adapts its lr nor decays it
    (BYOL, SimCLR, VICReg, Barlow Twins). ``fixed_lr`` (default False) tells
    :class:`~models.optim.WarmupCosine` to leave the group's lr alone. Empty groups are dropped.
    """
    weights: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for _, p in named:
        if p.requires_grad:
            (others if p.ndim <= 1 else weights).append(p)
    groups = [
        {"name": name, "params": weights, "lars_exclude": False, "fixed_lr": False, **flags},
        {"name": f"{name}/bias_norm", "params": others, "lars_exclude": True, "fixed_lr": False,
         **flags},
    ]
    return [g for g in groups if g["params"]]


class CheckpointMismatchError(RuntimeError):
    """A state dict that does not fit the method (another method, backbone or head widths).

    A ``RuntimeError`` like torch's own strict-load failure, so callers that catch that keep
    working; the message says which method and what differs.
    """


def _top_level(keys: Iterable[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in keys})


def _short(items: list[str], n: int = 5) -> str:
    head = ", ".join(items[:n])
    return head + (f" ... ({len(items)} in all)" if len(items) > n else "")


def check_state_dict_fits(module: nn.Module, state_dict: Mapping[str, Any], name: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` has exactly ``module``'s
    keys with the same shapes. Why: torch's own error lists hundreds of keys and never says
    that the checkpoint came from another method or configuration."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and hasattr(state_dict[k], "shape")
        and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or shapes):
        return
    parts = [f"the state dict does not fit method {name!r}"]
    theirs, ours = _top_level(state_dict), _top_level(own)
    if theirs != ours:
        parts.append(f"it holds modules [{', '.join(theirs)}] where {name!r} has "
                     f"[{', '.join(ours)}]: saved by another method (or MoCo's symmetric option)")
    if shapes:
        parts.append(f"shape mismatches (another backbone or head width?): {_short(shapes, 3)}")
    if missing:
        parts.append(f"missing keys: {_short(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_short(unexpected)}")
    raise CheckpointMismatchError("; ".join(parts))


class Method(nn.Module):
    """Base class: subclasses set ``name``, build heads/state, implement ``training_step``."""

    name: ClassVar[str] = ""

    def __init__(self, backbone: nn.Module, *, sync_bn: bool = True,
                 process_group: Any = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim_of(backbone)
        self.process_group = process_group
        self._sync_bn = bool(sync_bn)

    @property
    def wants_sync_bn(self) -> bool:
        """Whether BN should become SyncBatchNorm under multi-GPU DDP (the papers use
        cross-replica BN); SyncBN does not run on CPU, so gloo runs keep per-rank BN."""
        return self._sync_bn

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        return self.training_step(view1, view2)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError(f"{type(self).__name__}.training_step")

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Update state that must move only after a real optimizer step (none by default).

        Call it once per optimizer step that really happened (not for a step the fp16 grad
        scaler skipped). ``step`` is informational: the momentum schedule's k is the
        method's own update counter (a buffer, so it is checkpointed), which keeps the
        schedule right whether the caller counts from 0 or 1. ``total_steps`` is the K of
        the schedule.
        """

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; with ``strict`` a checkpoint of another method or
        shape raises :class:`CheckpointMismatchError` naming the difference, before anything
        is copied (torch's own check fails half-way, leaving a partly loaded model)."""
        if strict:
            check_state_dict_fits(self, state_dict, self.name or type(self).__name__)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the representation that evaluation and the registry use)."""
        return self.backbone(x)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters, split for LARS (see :func:`split_param_groups`)."""
        return split_param_groups(self.named_parameters(), self.name or "params")

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module,
                    process_group: Any = None) -> Method:
        raise NotImplementedError(f"{cls.__name__}.from_config")
