"""Margin contrastive learning (Hadsell, Chopra & LeCun 2006, "DrLIM") on two views.

online: backbone -> projector (Linear-BN-ReLU-Linear, as SimCLR)
loss:   contrastive_margin(z1, z2, margin): the two views of an image are pulled together,
        every pair of different images in the global batch is pushed beyond ``margin``
        (distances between L2-normalised embeddings with ``normalize: true``).

The oldest of the objectives here and the simplest contrastive baseline: no temperature,
no queue, no momentum.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.heads import simclr_projector
from models.methods.base import Method, MethodConfig, Metrics
from models.objectives import contrastive_margin


class Contrastive(Method):
    name = "contrastive"

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 128, margin: float = 1.0, normalize: bool = True,
                 gather: bool = True, sync_bn: bool = True, process_group: Any = None) -> None:
        super().__init__(backbone, sync_bn=sync_bn, process_group=process_group)
        self.projector = simclr_projector(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.margin = float(margin)
        self.normalize = bool(normalize)
        self.gather = bool(gather)

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module,
                    process_group: Any = None) -> Contrastive:
        return cls(backbone, proj_hidden_dim=cfg.int("proj_hidden_dim"),
                   proj_output_dim=cfg.int("proj_output_dim"), margin=cfg.float("margin"),
                   normalize=bool(cfg.opt("normalize", True)),
                   gather=bool(cfg.opt("gather", True)),
                   sync_bn=bool(cfg.opt("sync_bn", True)), process_group=process_group)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        loss = contrastive_margin(z1, z2, self.margin, normalize=self.normalize,
                                  group=self.process_group, gather=self.gather)
        return loss, {"loss": loss.detach(), "embeddings": z1.detach()}
