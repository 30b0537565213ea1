"""Backbones: image -> feature vector, with the classifier removed and the width exposed.

Three families:

* any torchvision classification model by name (``resnet18``, ``resnet50``, ``convnext_tiny``,
  ``vit_b_16``...): the final ``nn.Linear`` (the classifier) is replaced by ``nn.Identity`` and
  its input width becomes ``feature_dim``. Weights are random (self-supervised pre-training
  starts from scratch; nothing is downloaded).
* ``resnet_mini``: a small ResNet of torchvision ``BasicBlock`` s with configurable widths and
  depths, for CPU runs (the embedded default, tests). ``[1, 1, 1, 1]`` blocks of widths
  ``16/32/64/128`` cost ~16 MFLOP-MACs per 32 px image, ~1/35 of a CIFAR ResNet-18.
* ``vit_tiny`` / ``vit_small`` / ``vit_base``: timm's VisionTransformer (the field's standard;
  torchvision has no Tiny or Small) at any ``image_size`` and ``patch_size`` (224 / 16 for
  ImageNet, 32 / 4 or 8 for CIFAR), classifier removed: :class:`ViT`. timm is imported only
  when a ViT is built, so a ResNet encoder never needs it.

The CIFAR stem (``cifar_stem: true``) replaces a ResNet's 7x7 stride-2 conv and its max-pool by
one 3x3 stride-1 conv, as every CIFAR SSL recipe does (SimCLR appendix B.9, solo-learn): at
32 px the ImageNet stem throws away 15/16 of the pixels before the first block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

__all__ = ["NO_WEIGHT_DECAY", "VIT_NAMES", "ResNetMini", "ViT", "build_backbone",
           "feature_dim_of", "requirements", "without_drop_path"]

# The ViT sizes by name -> timm's model (widths, depths and heads of Touvron et al. 2021 and
# Dosovitskiy et al. 2021; image and patch size are set by the config).
VIT_NAMES = {
    "vit_tiny": "vit_tiny_patch16_224",    # 192 wide, 12 blocks, 3 heads, 5.5 M parameters
    "vit_small": "vit_small_patch16_224",  # 384 wide, 12 blocks, 6 heads, 21.7 M
    "vit_base": "vit_base_patch16_224",    # 768 wide, 12 blocks, 12 heads, 85.8 M (at 224/16)
}
# Leaf names of the ViT parameters that take no weight decay besides biases and norms (timm's
# ``no_weight_decay()``): the position embedding and the class / register / distillation tokens.
NO_WEIGHT_DECAY = frozenset({"pos_embed", "cls_token", "reg_token", "dist_token"})
_POOLS = {"token": "token", "mean": "avg"}


def _cifar_stem(model: nn.Module, name: str) -> None:
    """Swap a torchvision ResNet's ImageNet stem for the 3x3 stride-1 CIFAR stem in place."""
    conv1 = getattr(model, "conv1", None)
    if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
        raise ValueError(
            f"backbone.cifar_stem=true needs a ResNet-style model with conv1 and maxpool; "
            f"backbone.name={name!r} has none"
        )
    model.conv1 = nn.Conv2d(
        conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
    )
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()


def _strip_classifier(model: nn.Module, name: str) -> int:
    """Replace the last ``nn.Linear`` (the classifier) by ``nn.Identity``; return its in-width.

    Works for every torchvision classifier layout: ``fc`` (ResNet, RegNet), ``classifier[-1]``
    (EfficientNet, ConvNeXt, MobileNet), ``heads.head`` (ViT), ``head`` (Swin).
    """
    last: tuple[str, nn.Linear] | None = None
    for mod_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (mod_name, module)
    if last is None:
        raise ValueError(f"backbone.name={name!r}: no nn.Linear classifier found to remove")
    path, linear = last
    parent: nn.Module = model
    *parents, leaf = path.split(".")
    for part in parents:
        parent = getattr(parent, part)
    setattr(parent, leaf, nn.Identity())
    return int(linear.in_features)


class ResNetMini(nn.Module):
    """A small ResNet (BasicBlocks) for CPU-sized runs; output: ``(B, widths[-1])`` features.

    Same structure as torchvision's ResNet (stem, four stages, the first block of stages 2-4
    with stride 2 and a 1x1 projection shortcut, global average pool), with free widths and
    depths so it can be made as small as a CPU test needs.
    """

    def __init__(
        self,
        layers: Sequence[int] = (1, 1, 1, 1),
        widths: Sequence[int] = (16, 32, 64, 128),
        *,
        cifar_stem: bool = True,
        zero_init_residual: bool = False,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        if len(layers) != len(widths) or not layers:
            raise ValueError(
                f"backbone.layers and backbone.widths must have the same non-zero length, "
                f"got layers={list(layers)} widths={list(widths)}"
            )
        stem_width = int(widths[0])
        if cifar_stem:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 3, stride=1, padding=1, bias=False)
            self.maxpool: nn.Module = nn.Identity()
        else:
            self.conv1 = nn.Conv2d(in_channels, stem_width, 7, stride=2, padding=3, bias=False)
            self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.relu = nn.ReLU(inplace=True)
        stages: list[nn.Module] = []
        inplanes = stem_width
        for i, (depth, width) in enumerate(zip(layers, widths, strict=True)):
            stride = 1 if i == 0 else 2
            blocks: list[nn.Module] = []
            for j in range(int(depth)):
                s = stride if j == 0 else 1
                downsample = None
                if s != 1 or inplanes != width:
                    downsample = nn.Sequential(
                        nn.Conv2d(inplanes, width, 1, stride=s, bias=False),
                        nn.BatchNorm2d(width),
                    )
                blocks.append(BasicBlock(inplanes, int(width), stride=s, downsample=downsample))
                inplanes = int(width)
            stages.append(nn.Sequential(*blocks))
        self.layers = nn.Sequential(*stages)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = inplanes
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.zeros_(m.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layers(x)
        return torch.flatten(self.avgpool(x), 1)


class ViT(nn.Module):
    """A timm VisionTransformer without classifier: ``(B, 3, H, W) -> (B, embed_dim)``.

    ``pool="token"``: the class token after the final norm (DINO, MoCo v3); ``"mean"``: the
    mean of the patch tokens, then a LayerNorm (timm's ``global_pool="avg"``, as MAE).
    ``drop_path_rate``: stochastic depth, rising linearly over the blocks to this rate (DINO
    ViT-S: 0.1). Inputs of another size than ``image_size`` (multi-crop's local crops) get
    the position embedding interpolated (timm's ``dynamic_img_size``); each side must be a
    multiple of ``patch_size``. ``freeze_patch_embed``: MoCo v3's stabiliser, a random patch
    projection that never trains (initialised as the official code: uniform Xavier over the
    flattened patch). Weights are random (nothing is downloaded).
    """

    def __init__(self, name: str, *, image_size: int = 224, patch_size: int = 16,
                 drop_path_rate: float = 0.0, pool: str = "token",
                 freeze_patch_embed: bool = False, **timm_kwargs: Any) -> None:
        super().__init__()
        import timm  # here, not at the top: shipped ResNet encoders must import without timm

        if name not in VIT_NAMES:
            raise ValueError(f"backbone.name={name!r} is not a ViT; one of {sorted(VIT_NAMES)}")
        if pool not in _POOLS:
            raise ValueError(f"backbone.pool={pool!r} must be one of {sorted(_POOLS)}")
        if patch_size < 1 or image_size < 1 or image_size % patch_size:
            raise ValueError(
                f"backbone.patch_size={patch_size} must divide backbone.image_size={image_size}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"backbone.drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self.vit = timm.create_model(
            VIT_NAMES[name], pretrained=False, num_classes=0, img_size=image_size,
            patch_size=patch_size, drop_path_rate=drop_path_rate, global_pool=_POOLS[pool],
            dynamic_img_size=True, **timm_kwargs)
        self.image_size = int(image_size)
        self.patch_size = int(patch_size)
        self.pool = pool
        self.feature_dim = int(self.vit.num_features)
        if freeze_patch_embed:
            proj = self.vit.patch_embed.proj
            bound = math.sqrt(6.0 / float(3 * patch_size * patch_size + proj.out_channels))
            with torch.no_grad():
                nn.init.uniform_(proj.weight, -bound, bound)
                nn.init.zeros_(proj.bias)
            proj.requires_grad_(False)

    def drop_path_off(self) -> None:
        """Turn stochastic depth off, in place (the weights are untouched)."""
        from timm.layers import DropPath

        for m in self.vit.modules():
            if isinstance(m, DropPath):
                m.drop_prob = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"ViT: input {h}x{w} is not a multiple of backbone.patch_size="
                             f"{self.patch_size}")
        return self.vit(x)


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
    """A key of a backbone spec. This file is shipped alone with every registered encoder
    (orchestration/tracking/encoder_model.py) and builds from the spec saved then: a spec
    registered before a key existed lacks it, so absent keys read as the builder's
    default. The config's keys and defaults are models/backbone_config.py's."""
    getter = getattr(cfg, "get", None)
    value = getter(key, default) if getter is not None else getattr(cfg, key, default)
    return default if value is None else value


def build_backbone(cfg: Mapping[str, Any] | Any) -> nn.Module:
    """Build a backbone from its config (``cfg.backbone`` or a registered encoder's spec);
    ``.feature_dim`` is set.

    Keys: ``name`` (``resnet_mini``, ``vit_tiny`` / ``vit_small`` / ``vit_base`` or a
    torchvision classification model name), ``cifar_stem`` (bool), ``zero_init_residual``
    (bool), ``channels_last`` (bool: convert the weights to channels_last memory format,
    which tensor cores want for bf16/fp16 convs), ``widths`` / ``layers`` (``resnet_mini``
    only), ``image_size`` / ``patch_size`` / ``drop_path_rate`` / ``pool`` /
    ``freeze_patch_embed`` (ViTs only, see :class:`ViT`), ``kwargs`` (extra torchvision or
    timm arguments, e.g. ``depth: 6`` for a ViT smaller than Tiny).
    """
    name = _get(cfg, "name", None)
    if not name:
        raise ValueError("backbone.name is missing")
    name = str(name)
    cifar_stem = bool(_get(cfg, "cifar_stem", False))
    zero_init = bool(_get(cfg, "zero_init_residual", False))
    model: nn.Module
    if name in VIT_NAMES:
        if cifar_stem:
            raise ValueError(f"backbone.cifar_stem=true needs a ResNet-style model; "
                             f"backbone.name={name!r} is a ViT (set backbone.patch_size instead)")
        model = ViT(
            name,
            image_size=int(_get(cfg, "image_size", 224)),
            patch_size=int(_get(cfg, "patch_size", 16)),
            drop_path_rate=float(_get(cfg, "drop_path_rate", 0.0)),
            pool=str(_get(cfg, "pool", "token")),
            freeze_patch_embed=bool(_get(cfg, "freeze_patch_embed", False)),
            **dict(_get(cfg, "kwargs", {}) or {}),
        )
    elif name == "resnet_mini":
        model = ResNetMini(
            layers=tuple(_get(cfg, "layers", (1, 1, 1, 1))),
            widths=tuple(_get(cfg, "widths", (16, 32, 64, 128))),
            cifar_stem=cifar_stem,
            zero_init_residual=zero_init,
        )
    else:
        try:
            builder = tvm.get_model_builder(name)
        except ValueError as err:
            known = ", ".join(["resnet_mini", *VIT_NAMES, *tvm.list_models(module=tvm)])
            raise ValueError(f"backbone.name={name!r} is not a known model; one of: {known}") from err
        extra = dict(_get(cfg, "kwargs", {}) or {})
        if zero_init:
            extra["zero_init_residual"] = True
        model = builder(weights=None, **extra)
        if cifar_stem:
            _cifar_stem(model, name)
        model.feature_dim = _strip_classifier(model, name)  # type: ignore[assignment]
    if bool(_get(cfg, "channels_last", False)):
        model = model.to(memory_format=torch.channels_last)
    return model


def without_drop_path(module: nn.Module) -> nn.Module:
    """``module`` with stochastic depth off in every :class:`ViT` inside it (in place): a
    DINO teacher runs without it, as the official teacher, which is built without
    ``drop_path_rate``. Other networks are returned unchanged."""
    for m in module.modules():
        if isinstance(m, ViT):
            m.drop_path_off()
    return module


def feature_dim_of(backbone: nn.Module) -> int:
    """The width of ``backbone``'s output features (set by :func:`build_backbone`)."""
    dim = getattr(backbone, "feature_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"{type(backbone).__name__} has no integer feature_dim attribute")
    return dim


def requirements(cfg: Mapping[str, Any] | Any) -> list[str]:
    """The packages, besides torch and torchvision, that building ``cfg`` imports
    (``["timm"]`` for a ViT): a logged encoder's pip requirements add them."""
    return ["timm"] if str(_get(cfg, "name", "")) in VIT_NAMES else []
