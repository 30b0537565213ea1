"""VICReg (Bardes, Ponce & LeCun 2022): invariance + variance + covariance regularisation.

online: backbone -> expander (Linear-BN-ReLU x 2, Linear; 8192 wide in the paper)
loss:   sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance, the variance
        and covariance over the global batch (gathered with gradient); the unweighted terms
        are reported as metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import vicreg_expander
from sslstream.models.methods.base import Method, MethodConfig, Metrics, NonNegative, Width
from sslstream.models.objectives import vicreg_loss
from torch import nn


@dataclass(frozen=True, kw_only=True)
class VICRegConfig(MethodConfig):
    """Expander and the loss weights lambda, mu, nu (values: conf/recipe/vicreg_*.yaml)."""

    name = "vicreg"
    proj_hidden_dim: Width
    proj_output_dim: Width
    sim_coeff: NonNegative       # lambda
    std_coeff: NonNegative       # mu, for the official (halved) variance term
    cov_coeff: NonNegative       # nu
    proj_layers: Width = 3
    gather: bool = True      # variance/covariance over the global batch (with gradient)
    sync_bn: bool = True


class VICReg(Method):
    config_class = VICRegConfig

    def __init__(self, backbone: nn.Module, config: VICRegConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = vicreg_expander(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim,
                                         c.proj_layers)
        self.coeffs = (c.sim_coeff, c.std_coeff, c.cov_coeff)
        self.gather = c.gather

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        sim, std, cov = self.coeffs
        loss, parts = vicreg_loss(z1, z2, sim, std, cov, group=self.process_group,
                                  gather=self.gather)
        return loss, {"loss": loss.detach(), **parts, "embeddings": z1.detach()}
