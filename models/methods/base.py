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

__all__ = ["Method", "MethodConfig", "split_param_groups"]

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
