"""VICReg (Bardes, Ponce & LeCun 2022): invariance + variance + covariance regularisation.

online: backbone -> expander (Linear-BN-ReLU x 2, Linear; 8192 wide in the paper)
loss:   sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, the variance
        and covariance over the global batch (gathered with gradient); the unweighted terms
        are reported as metrics.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.heads import vicreg_expander
from models.methods.base import Method, MethodConfig, Metrics
from models.objectives import vicreg_loss


class VICReg(Method):
    name = "vicreg"

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int = 8192,
                 proj_output_dim: int = 8192, proj_layers: int = 3, sim_coeff: float = 25.0,
                 std_coeff: float = 25.0, cov_coeff: float = 1.0, gather: bool = True,
                 sync_bn: bool = True, process_group: Any = None) -> None:
        super().__init__(backbone, sync_bn=sync_bn, process_group=process_group)
        self.projector = vicreg_expander(self.feature_dim, proj_hidden_dim, proj_output_dim,
                                         proj_layers)
        self.coeffs = (float(sim_coeff), float(std_coeff), float(cov_coeff))
        self.gather = bool(gather)

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module,
                    process_group: Any = None) -> VICReg:
        return cls(backbone, proj_hidden_dim=cfg.int("proj_hidden_dim"),
                   proj_output_dim=cfg.int("proj_output_dim"),
                   proj_layers=int(cfg.opt("proj_layers", 3)),
                   sim_coeff=cfg.float("sim_coeff"), std_coeff=cfg.float("std_coeff"),
                   cov_coeff=cfg.float("cov_coeff"), gather=bool(cfg.opt("gather", True)),
                   sync_bn=bool(cfg.opt("sync_bn", True)), process_group=process_group)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        sim, std, cov = self.coeffs
        loss, parts = vicreg_loss(z1, z2, sim, std, cov, group=self.process_group,
                                  gather=self.gather, return_parts=True)
        return loss, {"loss": loss.detach(), **parts, "embeddings": z1.detach()}
