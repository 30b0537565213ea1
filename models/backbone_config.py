"""The backbone's config keys (``backbone.*``): which network, its stem, its init.

The typed side of models/backbones.py: that module is shipped alone inside every logged
encoder and imports nothing of sslstream, so it builds a backbone from the plain mapping this
config dumps to (a registered encoder's spec). The presets are conf/backbone/*.yaml.

The timm ViTs (``vit_tiny``, ``vit_small``, ``vit_base``) have keys of their own
(``image_size``, ``patch_size``, ``drop_path_rate``, ``pool``, ``freeze_patch_embed``; null
on other networks); any other torchvision classifier is ``backbone.name=<model>`` with its
builder's arguments in ``backbone.kwargs``. A family that needs keys of its own adds typed
fields here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from sslstream.conf.typed import (
    Check,
    ConfigValueError,
    Ge,
    Interval,
    MinLen,
    Typed,
    build,
    did_you_mean,
)

__all__ = ["BackboneConfig", "backbone_config", "backbone_names"]


@functools.cache
def backbone_names() -> tuple[str, ...]:
    """``resnet_mini``, the timm ViTs and every torchvision classification model (random init)."""
    from sslstream.models.backbones import VIT_NAMES
    from torchvision import models as tvm

    return ("resnet_mini", *VIT_NAMES, *tvm.list_models(module=tvm))


def _known(name: str) -> bool:
    return name in backbone_names()


def _is_vit(cfg: BackboneConfig) -> bool:
    from sslstream.models.backbones import VIT_NAMES

    return cfg.name in VIT_NAMES


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
    # ViTs (vit_tiny / vit_small / vit_base, models/backbones.py: ViT); null on other networks
    image_size: Annotated[int, Ge(1)] | None = None  # the global crop's side the position embedding is made for
    patch_size: Annotated[int, Ge(1)] | None = None  # 16 at 224 px, 4 or 8 at 32 px
    drop_path_rate: Annotated[float, Interval(ge=0, lt=1)] | None = None  # stochastic depth (linearly over blocks)
    pool: Literal["token", "mean"] | None = None     # the embedding: class token or mean of patch tokens
    freeze_patch_embed: bool | None = None           # MoCo v3: a frozen random patch projection
    kwargs: dict[str, Any] = field(default_factory=dict)  # extra arguments of the torchvision / timm builder

    def __post_init__(self) -> None:
        super().__post_init__()
        vit_keys = ("image_size", "patch_size", "drop_path_rate", "pool", "freeze_patch_embed")
        if _is_vit(self):
            if self.cifar_stem:
                raise ConfigValueError(
                    f"backbone.cifar_stem=true needs a ResNet-style model; backbone.name="
                    f"{self.name} is a ViT (set backbone.patch_size instead)", "backbone.cifar_stem")
            if self.image_size and self.patch_size and self.image_size % self.patch_size:
                raise ConfigValueError(
                    f"backbone.patch_size={self.patch_size} does not divide backbone.image_size="
                    f"{self.image_size}: a ViT cuts its input into whole patches",
                    "backbone.patch_size")
        else:
            for k in vit_keys:
                if getattr(self, k) is not None:
                    raise ConfigValueError(
                        f"backbone.{k} is a ViT key; backbone.name={self.name} is not a ViT "
                        "(vit_tiny | vit_small | vit_base)", f"backbone.{k}")


def backbone_config(cfg: BackboneConfig | Any) -> BackboneConfig:
    """``cfg.backbone`` as its typed config (a ready one is returned as is)."""
    return cfg if isinstance(cfg, BackboneConfig) else build(BackboneConfig, cfg, "backbone")
