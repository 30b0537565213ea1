"""The backbone's config keys (``backbone.*``): which network, its stem, its init.

Kept apart from models/backbones.py, which is shipped alone inside every logged encoder and
imports nothing of sslstream: it builds a backbone from the plain mapping this config dumps
to (a registered encoder's spec). The presets are conf/backbone/*.yaml.

A ViT or any other torchvision classifier is ``backbone.name=<model>`` with its builder's
arguments in ``backbone.kwargs`` (e.g. ``{image_size: 32, patch_size: 4}`` for
``vit_b_16``); a family that needs keys of its own adds typed fields here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar

from sslstream.conf.typed import Check, Ge, MinLen, Typed, build, did_you_mean

__all__ = ["BackboneConfig", "backbone_config", "backbone_names"]


@functools.cache
def backbone_names() -> tuple[str, ...]:
    """``resnet_mini`` and every torchvision classification model (random init)."""
    from torchvision import models as tvm

    return ("resnet_mini", *tvm.list_models(module=tvm))


def _known(name: str) -> bool:
    return name in backbone_names()


def _nearest(name: str) -> str:
    return did_you_mean(str(name), backbone_names())


@dataclass(frozen=True, kw_only=True)
class BackboneConfig(Typed):
    """``backbone.*``: see models/backbones.py ``build_backbone`` for what each key does."""

    config_key: ClassVar[str] = "backbone"
    name: Annotated[str, Check(_known, "resnet_mini or a torchvision model name "
                                       "(torchvision.models.list_models())", _nearest)]
    cifar_stem: bool = False            # 3x3 stride-1 first conv, no max-pool (32 px images)
    zero_init_residual: bool = False    # zero-init each block's last BN (Goyal et al.)
    channels_last: bool = False         # the trainer converts on CUDA (trainer.channels_last=auto)
    layers: Annotated[list[Annotated[int, Ge(1)]], MinLen(1)] | None = None  # resnet_mini: blocks per stage (null: [1, 1, 1, 1])
    widths: Annotated[list[Annotated[int, Ge(1)]], MinLen(1)] | None = None  # resnet_mini: channels per stage (null: [16, 32, 64, 128])
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of the torchvision builder


def backbone_config(cfg: BackboneConfig | Any) -> BackboneConfig:
    """``cfg.backbone`` as its typed config (a ready one is returned as is)."""
    return cfg if isinstance(cfg, BackboneConfig) else build(BackboneConfig, cfg, "backbone")
