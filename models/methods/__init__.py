"""SSL methods: one small class per method over backbone + heads + objective + state.

``build_method(cfg.method, cfg.backbone)`` picks the class by ``method.name``; each class
reads its hyper-parameters from ``conf/method/<name>.yaml`` (which states the CIFAR and
ImageNet presets and their sources; see docs/methods.md).

May import: models.backbones, models.heads, models.objectives, models.state.
Imported by: orchestration (train, tracking's encoder model), benchmarks, tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from models.backbones import build_backbone
from models.methods.barlow_twins import BarlowTwins
from models.methods.base import CheckpointMismatchError, Method, MethodConfig, split_param_groups
from models.methods.byol import BYOL
from models.methods.contrastive import Contrastive
from models.methods.moco import MoCoV2
from models.methods.simclr import SimCLR
from models.methods.simsiam import SimSiam
from models.methods.vicreg import VICReg

__all__ = [
    "BYOL",
    "METHODS",
    "CheckpointMismatchError",
    "BarlowTwins",
    "Contrastive",
    "Method",
    "MoCoV2",
    "SimCLR",
    "SimSiam",
    "VICReg",
    "build_method",
    "split_param_groups",
]

METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (BYOL, SimCLR, MoCoV2, SimSiam, VICReg, BarlowTwins, Contrastive)
}


def build_method(method_cfg: Mapping[str, Any] | Any, backbone_cfg: Mapping[str, Any] | Any,
                 *, process_group: Any = None) -> Method:
    """Backbone from ``backbone_cfg`` + the method named by ``method_cfg.name``.

    ``process_group``: the group the gathered objectives, the queue and shuffle-BN span
    (None: the default world group, or a single process when not distributed).
    """
    getter = getattr(method_cfg, "get", None)
    name = getter("name", None) if getter is not None else getattr(method_cfg, "name", None)
    if name not in METHODS:
        raise ValueError(f"method.name={name!r} is not one of {', '.join(sorted(METHODS))}")
    backbone = build_backbone(backbone_cfg)
    cls = METHODS[name]
    return cls.from_config(MethodConfig(method_cfg, name), backbone, process_group=process_group)
