"""The ``Method`` base class: backbone + heads + objective + state behind one step interface.

A method is an ``nn.Module`` so that everything it carries (online and momentum networks,
EMA step, queue and pointer) is in ``state_dict()``. The trainer only needs:

* ``training_step(views) -> (loss, metrics)``: ``views[:2]`` are the two global crops (one
  size), ``views[2:]`` the local crops of a multi-crop recipe (any number, a smaller size);
  ``metrics`` holds detached scalars and ``"embeddings"``, a detached (B, D) batch for the
  collapse monitors. Two-view methods read ``views[0], views[1]``; a method that takes local
  crops says so in ``multi_crop`` (DINO and SwAV also run on two global crops alone, as
  both peers' CIFAR recipes do), which the config checks against the recipe's ``augment.local.count`` (:meth:`Method.check_views`);
* ``after_backward(epoch)``: called after the backward pass(es) (and the unscale and clip)
  and before the optimizer step (DINO and SwAV drop the last layer's / prototypes'
  gradients in their first epoch);
* ``after_optimizer_step(step, total_steps)``: called once per *real* optimizer step; it
  moves the EMA targets a method declares in ``momentum_pairs`` (BYOL, MoCo), in one place;
* ``parameter_groups()``: optimiser groups carrying ``lars_exclude`` / ``fixed_lr`` flags;
* ``embed(x)``: backbone features for evaluation;
* ``wants_sync_bn``: convert BN to SyncBatchNorm (CUDA + DDP only; the trainer does it);
* ``ddp_static_buffers``: buffers identical on every rank by construction, which DDP need
  not broadcast (MoCo's queue).

``forward`` is ``training_step`` (after :meth:`Method.check_views`), so DDP wraps the method
directly.

Each method's hyper-parameters are one frozen dataclass (a :class:`MethodConfig` subclass:
typed fields with their ranges, conf/typed.py) that ``__init__`` takes whole; the
values come from the method's recipe files (conf/recipe/<method>_<regime>.yaml) and the
command line. Mistakes raise :class:`MethodConfigError` naming ``method.<key>``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, NamedTuple, Self

import torch
from sslstream.conf.typed import (
    ConfigValueError,
    Ge,
    Gt,
    Interval,
    Typed,
    build,
)
from sslstream.models.backbones import NO_WEIGHT_DECAY, feature_dim_of
from sslstream.models.state import MomentumEncoder
from torch import nn

__all__ = [
    "CheckpointMismatchError",
    "Method",
    "MethodConfig",
    "MethodConfigError",
    "MomentumPair",
    "no_weight_decay",
    "split_param_groups",
]

Metrics = dict[str, Any]

# Ranges the methods' configs share (conf/typed.py reads them)
Width = Annotated[int, Ge(1)]                      # a head's layer width or layer count
Momentum = Annotated[float, Interval(ge=0, le=1)]  # an EMA coefficient tau (1: frozen target)
Positive = Annotated[float, Gt(0)]                 # a temperature, a margin, a loss scale
NonNegative = Annotated[float, Ge(0)]              # a loss weight, an lr multiplier

MethodConfigError = ConfigValueError
"""A ``method.*`` key that is unknown, missing, of the wrong type or out of range: the one
config error of conf/typed.py (a ``ValueError``; the CLI exits 2 for it). The
message names the key as ``method.<key>`` and, for an unknown key, the nearest one."""


@dataclass(frozen=True, kw_only=True)
class MethodConfig(Typed):
    """Base of the per-method hyper-parameter dataclasses (``BYOLConfig``, ...).

    Each ``method.*`` key is declared once, as a typed field of its method's config, with its
    range and its default (a field without a default must come from the recipe file). The
    class's ``name`` is the method's registry name (``method.name`` in the config).
    :meth:`from_mapping` builds a config from ``cfg.method``; the checks run in
    ``__post_init__`` too, so a config written in Python obeys the same rules.
    """

    name: ClassVar[str] = ""
    config_key: ClassVar[str] = "method"

    @classmethod
    def keys(cls) -> list[str]:
        """The hyper-parameter keys, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> Self:
        """The config for ``cfg`` (``cfg.method``); an instance of ``cls`` is returned as is."""
        if isinstance(cfg, cls):
            return cfg
        return build(cls, cfg, "method")


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Whether a parameter takes no weight decay: biases and norm parameters (``ndim <= 1``)
    and a ViT's position embedding and tokens (leaf name in ``backbones.NO_WEIGHT_DECAY``)."""
    return p.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_WEIGHT_DECAY


def split_param_groups(named: Iterable[tuple[str, nn.Parameter]], name: str,
                       **flags: Any) -> list[dict[str, Any]]:
    """Split trainable parameters into weights and the rest (:func:`no_weight_decay`: biases,
    norm parameters, a ViT's position embedding and class token).

    The second group is flagged ``lars_exclude``: LARS neither adapts its lr nor decays it
    (BYOL, SimCLR, VICReg, Barlow Twins), and SGD / AdamW do not decay it with
    ``optim.exclude_bias_and_norm_wd`` (timm's and MAE's rule for ViTs). ``fixed_lr``
    (default False) tells :class:`~sslstream.models.optim.WarmupCosine` to leave the group's
    lr alone. Empty groups are dropped.
    """
    weights: list[nn.Parameter] = []
    others: list[nn.Parameter] = []
    for param_name, p in named:
        if p.requires_grad:
            (others if no_weight_decay(param_name, p) else weights).append(p)
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
        if k in state_dict and isinstance(state_dict[k], torch.Tensor)
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


class MomentumPair(NamedTuple):
    """Online modules and the EMA target that follows them (solo-learn's ``momentum_pairs``).

    ``target.target`` is a deep copy of ``nn.Sequential(*online)``: its parameters come in
    the order of the online modules' parameters, chained.
    """

    online: tuple[nn.Module, ...]
    target: MomentumEncoder


class Method(nn.Module):
    """Base class: subclasses set ``config_class`` (whose ``name`` becomes theirs), build
    heads/state from their config, implement ``training_step``, and declare EMA targets in
    ``momentum_pairs`` and whether they take local crops in ``multi_crop``."""

    name: ClassVar[str] = ""  # the config class's name (set for every subclass)
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # The views a method takes: two global crops always; local crops (views[2:]) only when
    # multi_crop (DINO, SwAV; zero local crops is their CIFAR recipe, as in solo-learn and
    # lightly's CIFAR-10 benchmark).
    multi_crop: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = cls.config_class.name

    def __init__(self, backbone: nn.Module, config: MethodConfig, *,
                 process_group: Any = None) -> None:
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} takes a {self.config_class.__name__} (build one with "
                f"{self.config_class.__name__}.from_mapping(cfg.method)), got "
                f"{type(config).__name__}"
            )
        self.config = config
        self.backbone = backbone
        self.feature_dim = feature_dim_of(backbone)
        self.process_group = process_group
        self.epoch = 0  # the epoch of the coming steps (set_epoch)

    @property
    def wants_sync_bn(self) -> bool:
        """Whether BN should become SyncBatchNorm under multi-GPU DDP (the papers use
        cross-replica BN): ``method.sync_bn`` where the config has it. SyncBN does not run
        on CPU, so gloo runs keep per-rank BN."""
        return bool(getattr(self.config, "sync_bn", False))

    @property
    def ddp_static_buffers(self) -> list[str]:
        """Names of buffers that are the same on every rank by construction, which DDP's
        per-step buffer broadcast skips (none by default; MoCo lists its queue)."""
        return []

    @classmethod
    def check_views(cls, local_crops: int) -> None:
        """Raise :class:`MethodConfigError` naming ``augment.local.count`` unless this method
        takes two global crops and ``local_crops`` local ones (the config checks it before
        any data is read; :meth:`forward` again for every batch)."""
        if local_crops < 0:
            raise MethodConfigError(f"augment.local.count={local_crops} must be >= 0",
                                    "augment.local.count")
        if local_crops and not cls.multi_crop:
            raise MethodConfigError(
                f"augment.local.count={local_crops}: method {cls.name or cls.__name__} takes "
                "two views only (no local crops); set augment.local.count=0 or pick a "
                "multi-crop method", "augment.local.count")

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """``training_step``: what DDP, which hooks ``forward``, runs."""
        if len(views) < 2:
            raise ValueError(f"{type(self).__name__} takes two global views (+ local crops), "
                             f"got {len(views)} view(s)")
        self.check_views(len(views) - 2)
        return self.training_step(views)

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        """The loss of one batch: ``views[0]``, ``views[1]`` the global crops, ``views[2:]``
        the local ones (see the module docstring)."""
        raise NotImplementedError(f"{type(self).__name__}.training_step")

    def after_backward(self, epoch: int) -> None:
        """Called once per optimizer step with the epoch (from 0): after the backward
        pass(es) of every micro-batch and the fp16 unscale and the clip, right before the
        optimizer step (DINO's order: its gradient norm is clipped first, then the frozen
        last layer's gradients are dropped). Nothing by default; DINO and SwAV cancel the
        last layer's / prototypes' gradients during their first epoch(s) here."""

    @property
    def momentum_pairs(self) -> list[MomentumPair]:
        """The EMA targets that :meth:`after_optimizer_step` moves (none by default).

        BYOL and MoCo declare ``[MomentumPair((backbone, projector), momentum)]``; a method
        with more targets lists them all, and they all move in that one place.
        """
        return []

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Move every momentum target towards its online modules (nothing else moves here).

        Call it once per optimizer step that really happened (not for a step the fp16 grad
        scaler skipped). ``step`` is informational: the momentum schedule's k is the
        target's own update counter (a buffer, so it is checkpointed), which keeps the
        schedule right whether the caller counts from 0 or 1. ``total_steps`` is the K of
        the schedule.
        """
        for online, target in self.momentum_pairs:
            params = itertools.chain.from_iterable(m.parameters() for m in online)
            target.update(params, total_steps)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True,
                        assign: bool = False) -> Any:
        """``nn.Module.load_state_dict``; with ``strict`` a checkpoint of another method or
        shape raises :class:`CheckpointMismatchError` naming the difference, before anything
        is copied (torch's own check fails half-way, leaving a partly loaded model)."""
        if strict:
            check_state_dict_fits(self, state_dict, self.name or type(self).__name__)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the epoch (from 0) its next steps belong to; the trainer calls it
        before the first step of every epoch and of a resumed run, as it sets the loader's
        epoch. Schedules counted in epochs read it inside the forward (DINO's teacher
        temperature, SwAV's queue start), where ``after_backward`` would come too late."""
        if epoch < 0:
            raise ValueError(f"set_epoch: epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the representation that evaluation and the registry use)."""
        return self.backbone(x)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters, split for LARS (see :func:`split_param_groups`)."""
        return split_param_groups(self.named_parameters(), self.name or "params")
