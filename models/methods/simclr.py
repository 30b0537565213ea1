"""SimCLR (Chen et al. 2020): NT-Xent over the two views of the global batch.

online: backbone -> projector (Linear-BN-ReLU-Linear)
loss:   nt_xent(z1, z2, temperature), local anchors against candidates gathered (with
        gradient) from every rank, as the official code does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import simclr_projector
from sslstream.models.methods.base import Method, MethodConfig, Metrics, Positive, Width
from sslstream.models.objectives import nt_xent
from torch import nn


@dataclass(frozen=True, kw_only=True)
class SimCLRConfig(MethodConfig):
    """Hyper-parameters (values: conf/recipe/simclr_*.yaml)."""

    name = "simclr"
    proj_hidden_dim: Width
    proj_output_dim: Width
    temperature: Positive
    gather: bool = True      # negatives from every rank (with gradient)
    sync_bn: bool = True


class SimCLR(Method):
    config_class = SimCLRConfig

    def __init__(self, backbone: nn.Module, config: SimCLRConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = simclr_projector(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim)
        self.temperature = c.temperature
        self.gather = c.gather

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        loss, _ = nt_xent(z1, z2, self.temperature, group=self.process_group,
                          gather=self.gather)
        return loss, {"loss": loss.detach(), "embeddings": z1.detach()}
