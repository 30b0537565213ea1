"""Backbones: image -> feature vector, with the classifier removed and the width exposed.

Two families:

* any torchvision classification model by name (``resnet18``, ``resnet50``, ``convnext_tiny``,
  ``vit_b_16``...): the final ``nn.Linear`` (the classifier) is replaced by ``nn.Identity`` and
  its input width becomes ``feature_dim``. Weights are random (self-supervised pre-training
  starts from scratch; nothing is downloaded).
* ``resnet_mini``: a small ResNet of torchvision ``BasicBlock`` s with configurable widths and
  depths, for CPU runs (the embedded default, tests). ``[1, 1, 1, 1]`` blocks of widths
  ``16/32/64/128`` cost ~16 MFLOP-MACs per 32 px image, ~1/35 of a CIFAR ResNet-18.

The CIFAR stem (``cifar_stem: true``) replaces a ResNet's 7x7 stride-2 conv and its max-pool by
one 3x3 stride-1 conv, as every CIFAR SSL recipe does (SimCLR appendix B.9, solo-learn): at
32 px the ImageNet stem throws away 15/16 of the pixels before the first block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.resnet import BasicBlock

__all__ = ["ResNetMini", "build_backbone", "feature_dim_of"]


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

    Keys: ``name`` (``resnet_mini`` or a torchvision classification model name),
    ``cifar_stem`` (bool), ``zero_init_residual`` (bool), ``channels_last`` (bool: convert the
    weights to channels_last memory format, which tensor cores want for bf16/fp16 convs),
    ``widths`` / ``layers`` (``resnet_mini`` only), ``kwargs`` (extra torchvision arguments).
    """
    name = _get(cfg, "name", None)
    if not name:
        raise ValueError("backbone.name is missing")
    name = str(name)
    cifar_stem = bool(_get(cfg, "cifar_stem", False))
    zero_init = bool(_get(cfg, "zero_init_residual", False))
    if name == "resnet_mini":
        model: nn.Module = ResNetMini(
            layers=tuple(_get(cfg, "layers", (1, 1, 1, 1))),
            widths=tuple(_get(cfg, "widths", (16, 32, 64, 128))),
            cifar_stem=cifar_stem,
            zero_init_residual=zero_init,
        )
        feature_dim = model.feature_dim
    else:
        try:
            builder = tvm.get_model_builder(name)
        except ValueError as err:
            known = ", ".join(["resnet_mini", *tvm.list_models(module=tvm)])
            raise ValueError(f"backbone.name={name!r} is not a known model; one of: {known}") from err
        extra = dict(_get(cfg, "kwargs", {}) or {})
        if zero_init:
            extra["zero_init_residual"] = True
        model = builder(weights=None, **extra)
        if cifar_stem:
            _cifar_stem(model, name)
        feature_dim = _strip_classifier(model, name)
        model.feature_dim = feature_dim  # type: ignore[assignment]
    if bool(_get(cfg, "channels_last", False)):
        model = model.to(memory_format=torch.channels_last)
    return model


def feature_dim_of(backbone: nn.Module) -> int:
    """The width of ``backbone``'s output features (set by :func:`build_backbone`)."""
    dim = getattr(backbone, "feature_dim", None)
    if not isinstance(dim, int):
        raise ValueError(f"{type(backbone).__name__} has no integer feature_dim attribute")
    return dim

