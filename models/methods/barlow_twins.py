"""Barlow Twins (Zbontar et al. 2021): drive the views' cross-correlation to the identity.

online: backbone -> projector (3 layers, 8192 wide in the paper, no biases)
loss:   scale_loss * (on_diag + lambd * off_diag) over the global batch.

``scale_loss`` is solo-learn's CIFAR factor (0.1); 1.0 is the paper. ``bias_lr_mult``
multiplies the lr of biases and norm parameters (the paper: 0.0048 / 0.2 = 0.024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import barlow_projector
from sslstream.models.methods.base import (
    Method,
    MethodConfig,
    Metrics,
    NonNegative,
    Positive,
    Width,
    split_param_groups,
)
from sslstream.models.objectives import barlow_twins_loss
from torch import nn


@dataclass(frozen=True, kw_only=True)
class BarlowTwinsConfig(MethodConfig):
    """Hyper-parameters (values: conf/recipe/barlow_twins_*.yaml)."""

    name = "barlow_twins"
    proj_hidden_dim: Width
    proj_output_dim: Width
    lambd: NonNegative               # off-diagonal weight
    proj_layers: Width = 3
    scale_loss: Positive = 1.0       # solo-learn's CIFAR factor 0.1; 1.0 is the paper
    bias_lr_mult: NonNegative = 1.0  # lr multiplier of biases and norm parameters
    gather: bool = True
    sync_bn: bool = True


class BarlowTwins(Method):
    config_class = BarlowTwinsConfig

    def __init__(self, backbone: nn.Module, config: BarlowTwinsConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = barlow_projector(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim,
                                          c.proj_layers)
        self.lambd = c.lambd
        self.scale_loss = c.scale_loss
        self.bias_lr_mult = c.bias_lr_mult
        self.gather = c.gather

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        loss, parts = barlow_twins_loss(z1, z2, self.lambd, group=self.process_group,
                                        gather=self.gather)
        loss = self.scale_loss * loss
        return loss, {"loss": loss.detach(), **parts, "embeddings": z1.detach()}

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = split_param_groups(self.named_parameters(), self.name)
        for g in groups:
            if g["lars_exclude"]:
                g["lr_mult"] = self.bias_lr_mult
        return groups
