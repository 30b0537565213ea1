"""Margin contrastive learning (Hadsell, Chopra & LeCun 2006, "DrLIM") on two views.

online: backbone -> projector (Linear-BN-ReLU-Linear, as SimCLR)
loss:   contrastive_margin(z1, z2, margin): the two views of an image are pulled together,
        every pair of different images in the global batch is pushed beyond ``margin``
        (distances between L2-normalised embeddings with ``normalize: true``).

The oldest of the objectives here and the simplest contrastive baseline: no temperature,
no queue, no momentum.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import simclr_projector
from sslstream.models.methods.base import Method, MethodConfig, Metrics, Positive, Width
from sslstream.models.objectives import contrastive_margin
from torch import nn


@dataclass(frozen=True, kw_only=True)
class ContrastiveConfig(MethodConfig):
    """Hyper-parameters (values: conf/recipe/contrastive_*.yaml)."""

    name = "contrastive"
    proj_hidden_dim: Width
    proj_output_dim: Width
    margin: Positive
    normalize: bool = True   # L2-normalise before measuring distances
    gather: bool = True      # negatives from every rank (with gradient)
    sync_bn: bool = True


class Contrastive(Method):
    config_class = ContrastiveConfig

    def __init__(self, backbone: nn.Module, config: ContrastiveConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = simclr_projector(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim)
        self.margin = c.margin
        self.normalize = c.normalize
        self.gather = c.gather

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        loss, _ = contrastive_margin(z1, z2, self.margin, normalize=self.normalize,
                                     group=self.process_group, gather=self.gather)
        return loss, {"loss": loss.detach(), "embeddings": z1.detach()}
