"""SSL methods: one small class per method over backbone + heads + objective + state.

The registry ``METHODS`` maps ``method.name`` to the class; ``build_method(cfg.method,
cfg.backbone)`` builds the one the config names. Each class has a frozen dataclass config
(``BYOLConfig``, ...: every ``method.*`` key once, typed, with its range and default) that
its ``__init__`` takes whole; the values come from the method's recipe files
(conf/recipe/<name>_<regime>.yaml, with their sources; docs/methods.md). A bad key raises
:class:`MethodConfigError` (a ``ValueError``) naming ``method.<key>``.

Adding a method (docs/adding-a-method.md): its objective (models/objectives/), its file here
(config dataclass + ``Method`` subclass), ONE entry in ``METHODS`` below, its recipe files,
its tests (they enumerate ``METHODS``).

May import: models.backbones, models.heads, models.objectives, models.state, sslstream.conf.typed.
Imported by: orchestration (schema, train, tracking's encoder model), benchmarks, tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sslstream.conf.typed import did_you_mean
from sslstream.models.backbones import build_backbone
from sslstream.models.methods.barlow_twins import BarlowTwins
from sslstream.models.methods.base import (
    CheckpointMismatchError,
    Method,
    MethodConfig,
    MethodConfigError,
    MomentumPair,
    split_param_groups,
)
from sslstream.models.methods.byol import BYOL
from sslstream.models.methods.contrastive import Contrastive
from sslstream.models.methods.dino import DINO
from sslstream.models.methods.moco import MoCoV2
from sslstream.models.methods.mocov3 import MoCoV3
from sslstream.models.methods.simclr import SimCLR
from sslstream.models.methods.simsiam import SimSiam
from sslstream.models.methods.swav import SwAV
from sslstream.models.methods.vicreg import VICReg
from torch import nn

__all__ = [
    "METHODS",
    "CheckpointMismatchError",
    "Method",
    "MethodConfig",
    "MethodConfigError",
    "MomentumPair",
    "build_method",
    "method_class",
    "split_param_groups",
]

# The registry: a method is known (to the config, the CLI's --help, the tests) once it is here.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (BYOL, SimCLR, MoCoV2, SimSiam, VICReg, BarlowTwins, Contrastive,
                              DINO, MoCoV3, SwAV)
}


def method_class(method_cfg: Mapping[str, Any] | MethodConfig) -> type[Method]:
    """The class for ``method_cfg``: the type of a ready config, or ``method.name``."""
    if isinstance(method_cfg, MethodConfig):
        for cls in METHODS.values():
            if type(method_cfg) is cls.config_class:
                return cls
        raise MethodConfigError(f"no method takes a {type(method_cfg).__name__}", "method")
    name = method_cfg.get("name")
    if name not in METHODS:
        raise MethodConfigError(f"method.name={name!r} is not one of {', '.join(sorted(METHODS))}"
                                f"{did_you_mean(str(name), sorted(METHODS))}", "method.name")
    return METHODS[str(name)]


def build_method(method_cfg: Mapping[str, Any] | MethodConfig,
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
