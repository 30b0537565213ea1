"""SimCLR (Chen et al. 2020): NT-Xent over the two views of the global batch.

online: backbone -> projector (Linear-BN-ReLU-Linear)
loss:   nt_xent(z1, z2, temperature), local anchors against candidates gathered (with
        gradient) from every rank, as the official code does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.heads import simclr_projector
from models.methods.base import Method, MethodConfig, Metrics
from models.objectives import nt_xent


class SimCLR(Method):
    name = "simclr"

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int = 2048,
                 proj_output_dim: int = 128, temperature: float = 0.1, gather: bool = True,
                 sync_bn: bool = True, process_group: Any = None) -> None:
        super().__init__(backbone, sync_bn=sync_bn, process_group=process_group)
        self.projector = simclr_projector(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.temperature = float(temperature)
        self.gather = bool(gather)

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module,
                    process_group: Any = None) -> SimCLR:
        return cls(backbone, proj_hidden_dim=cfg.int("proj_hidden_dim"),
                   proj_output_dim=cfg.int("proj_output_dim"),
                   temperature=cfg.float("temperature"), gather=bool(cfg.opt("gather", True)),
                   sync_bn=bool(cfg.opt("sync_bn", True)), process_group=process_group)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        loss = nt_xent(z1, z2, self.temperature, group=self.process_group, gather=self.gather)
        return loss, {"loss": loss.detach(), "embeddings": z1.detach()}
