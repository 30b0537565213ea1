"""The ``Method`` base class: backbone + heads + objective + state behind one step interface.

A method is an ``nn.Module`` so that everything it carries (online and momentum networks,
EMA step, queue and pointer) is in ``state_dict()``. The trainer only needs:

* ``training_step(view1, view2) -> (loss, metrics)``: ``metrics`` holds detached scalars
  and ``"embeddings"``, a detached (B, D) batch for the collapse monitors;
* ``after_optimizer_step(step, total_steps)``: called once per *real* optimizer step; it
  moves the EMA targets a method declares in ``momentum_pairs`` (BYOL, MoCo), in one place;
* ``parameter_groups()``: optimiser groups carrying ``lars_exclude`` / ``fixed_lr`` flags;
* ``embed(x)``: backbone features for evaluation;
* ``wants_sync_bn``: convert BN to SyncBatchNorm (CUDA + DDP only; the trainer does it);
* ``ddp_static_buffers``: buffers identical on every rank by construction, which DDP need
  not broadcast (MoCo's queue).

``forward`` is ``training_step``, so DDP wraps the method directly.

Each method's hyper-parameters are one frozen dataclass (a :class:`MethodConfig` subclass:
typed fields, built from ``cfg.method`` by ``from_mapping``) that ``__init__`` takes whole;
configuration mistakes raise :class:`MethodConfigError`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Self

import torch
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


class MethodConfigError(ValueError):
    """A ``method.*`` key that is unknown, missing or of the wrong type.

    A ``ValueError``, so callers that catch those keep working; a type of its own, so the
    CLI can tell a configuration mistake (exit 2, no traceback) from a bug. The message
    names the key as ``method.<key>`` and, for an unknown key, the allowed keys and the
    nearest one ("did you mean").
    """


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """``" (did you mean 'x'?)"`` for the closest candidate, ``""`` when none is close."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str, where: str) -> Any:
    """``value`` checked against ``hint`` (int, float, bool, str, Literal[...], X | None)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]  # only ``X | None`` is used
        return _coerce(value, inner, key, where)
    if origin is typing.Literal:
        if isinstance(value, str) and value.lower() in args:
            return value.lower()
        hint_ = did_you_mean(value.lower(), args) if isinstance(value, str) else ""
        raise MethodConfigError(f"method.{key} must be one of {', '.join(args)}, got "
                                f"{value!r}{hint_} ({where})")
    ok = (
        (hint is bool and isinstance(value, bool))
        or (hint is int and isinstance(value, int) and not isinstance(value, bool))
        or (hint is float and isinstance(value, int | float) and not isinstance(value, bool))
        or (hint is str and isinstance(value, str))
    )
    if not ok:
        raise MethodConfigError(f"method.{key} must be {_type_name(hint)}, got {value!r} "
                                f"({type(value).__name__}) ({where})")
    return float(value) if hint is float else value


def _as_dict(cfg: Mapping[str, Any] | Any) -> dict[str, Any]:
    """A DictConfig (interpolations resolved by ``items()``), a mapping or a namespace."""
    items = getattr(cfg, "items", None)
    return dict(items()) if items is not None else dict(vars(cfg))


@dataclass(frozen=True, kw_only=True)
class MethodConfig:
    """Base of the per-method hyper-parameter dataclasses (``BYOLConfig``, ...).

    Why: each ``method.*`` key is declared once, as a typed field of its method's config;
    the yaml (``conf/method/<name>.yaml``) supplies the values and presets, and the method's
    ``__init__`` takes the config whole. A field without a default is required in the yaml.

    :meth:`from_mapping` builds a config from ``cfg.method``: an unknown key, a missing
    required key or a wrong type raises :class:`MethodConfigError`; a key set to ``null``
    counts as absent (the default applies). The yaml's bookkeeping keys (``META_KEYS``:
    ``name``, ``preset``, ``presets``) are not hyper-parameters and are skipped. Types are
    checked in ``__post_init__``, so a config built in Python obeys the same rules: ``int``
    takes an int (not a bool), ``float`` an int or a float (stored as float), ``bool`` a
    bool only (no ``bool("false") == True``), ``Literal[...]`` one of its strings
    (case-insensitive, stored lower-case), ``X | None`` also None.
    """

    method_name: ClassVar[str] = ""
    META_KEYS: ClassVar[frozenset[str]] = frozenset({"name", "preset", "presets"})

    def __post_init__(self) -> None:
        hints = _field_types(type(self))
        where = f"method {self.method_name!r}"
        for f in dataclasses.fields(self):
            value = _coerce(getattr(self, f.name), hints[f.name], f.name, where)
            object.__setattr__(self, f.name, value)

    @classmethod
    def keys(cls) -> list[str]:
        """The hyper-parameter keys, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any] | Any) -> Self:
        """The config for ``cfg`` (``cfg.method``); an instance of ``cls`` is returned as is."""
        if isinstance(cfg, cls):
            return cfg
        raw = _as_dict(cfg)
        keys = cls.keys()
        where = f"method {cls.method_name!r}"
        for key in raw:
            if key not in keys and key not in cls.META_KEYS:
                allowed = ", ".join(sorted(keys))
                raise MethodConfigError(
                    f"method.{key} is not a key of {where}{did_you_mean(key, keys)}; "
                    f"allowed keys: {allowed} (and {', '.join(sorted(cls.META_KEYS))})"
                )
        values = {k: v for k, v in raw.items() if k in keys and v is not None}
        missing = [f"method.{f.name}" for f in dataclasses.fields(cls)
                   if f.name not in values and f.default is dataclasses.MISSING
                   and f.default_factory is dataclasses.MISSING]
        if missing:
            verb = "is" if len(missing) == 1 else "are"
            raise MethodConfigError(f"{', '.join(missing)} {verb} missing ({where})")
        return cls(**values)


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
    """Base class: subclasses set ``name`` and ``config_class``, build heads/state from their
    config, implement ``training_step``, and declare EMA targets in ``momentum_pairs``."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig

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

    def forward(self, view1: torch.Tensor, view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        """``training_step``: what DDP, which hooks ``forward``, runs."""
        return self.training_step(view1, view2)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        raise NotImplementedError(f"{type(self).__name__}.training_step")

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

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone features (the representation that evaluation and the registry use)."""
        return self.backbone(x)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """All trainable parameters, split for LARS (see :func:`split_param_groups`)."""
        return split_param_groups(self.named_parameters(), self.name or "params")
