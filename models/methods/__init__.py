"""SSL methods: one small class per method over backbone + heads + objective + state.

``build_method(cfg.method, cfg.backbone)`` picks the class by ``method.name``; each class
has a frozen dataclass config (``BYOLConfig``, ...: every ``method.*`` key once, typed) that
``from_mapping`` builds from ``conf/method/<name>.yaml`` (which states the CIFAR and ImageNet
presets and their sources; see docs/methods.md) and that the method's ``__init__`` takes
whole. A bad key raises :class:`MethodConfigError` (a ``ValueError``) naming ``method.<key>``.

May import: models.backbones, models.heads, models.objectives, models.state.
Imported by: orchestration (train, tracking's encoder model), benchmarks, tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sslstream.models.backbones import build_backbone
from sslstream.models.methods.barlow_twins import BarlowTwins, BarlowTwinsConfig
from sslstream.models.methods.base import (
    CheckpointMismatchError,
    Method,
    MethodConfig,
    MethodConfigError,
    MomentumPair,
    did_you_mean,
    split_param_groups,
)
from sslstream.models.methods.byol import BYOL, BYOLConfig
from sslstream.models.methods.contrastive import Contrastive, ContrastiveConfig
from sslstream.models.methods.moco import MoCoV2, MoCoV2Config
from sslstream.models.methods.simclr import SimCLR, SimCLRConfig
from sslstream.models.methods.simsiam import SimSiam, SimSiamConfig
from sslstream.models.methods.vicreg import VICReg, VICRegConfig
from torch import nn

__all__ = [
    "BYOL",
    "METHODS",
    "BYOLConfig",
    "BarlowTwins",
    "BarlowTwinsConfig",
    "CheckpointMismatchError",
    "Contrastive",
    "ContrastiveConfig",
    "Method",
    "MethodConfig",
    "MethodConfigError",
    "MoCoV2",
    "MoCoV2Config",
    "MomentumPair",
    "SimCLR",
    "SimCLRConfig",
    "SimSiam",
    "SimSiamConfig",
    "VICReg",
    "VICRegConfig",
    "build_method",
    "method_class",
    "split_param_groups",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (BYOL, SimCLR, MoCoV2, SimSiam, VICReg, BarlowTwins, Contrastive)
}


def method_class(method_cfg: Mapping[str, Any] | MethodConfig | Any) -> type[Method]:
    """The class for ``method_cfg``: by ``method.name``, or by the type of a ready config."""
    if isinstance(method_cfg, MethodConfig):
        for cls in METHODS.values():
            if type(method_cfg) is cls.config_class:
                return cls
        raise MethodConfigError(f"no method takes a {type(method_cfg).__name__}")
    getter = getattr(method_cfg, "get", None)
    name = getter("name", None) if getter is not None else getattr(method_cfg, "name", None)
    if name not in METHODS:
        raise MethodConfigError(f"method.name={name!r} is not one of {', '.join(sorted(METHODS))}"
                                f"{did_you_mean(str(name), METHODS)}")
    return METHODS[name]


def build_method(method_cfg: Mapping[str, Any] | MethodConfig | Any,
                 backbone_cfg: Mapping[str, Any] | Any, *, process_group: Any = None,
                 backbone: nn.Module | None = None) -> Method:
    """Backbone from ``backbone_cfg`` + the method named by ``method_cfg.name``.

    ``method_cfg``: ``cfg.method`` (checked against the method's config dataclass before the
    backbone is built) or a ready ``<Method>Config``. ``backbone``: an already built (e.g.
    warm-started) backbone to use instead of building one from ``backbone_cfg``.
    ``process_group``: the group the gathered objectives, the queue and shuffle-BN span
    (None: the default world group, or a single process when not distributed).
    """
    cls = method_class(method_cfg)
    config = cls.config_class.from_mapping(method_cfg)
    if backbone is None:
        backbone = build_backbone(backbone_cfg)
    return cls(backbone, config, process_group=process_group)
