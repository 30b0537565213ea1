"""BYOL (Grill et al. 2020): an online network predicts an EMA target's projection.

online: backbone -> projector (4096-BN-ReLU-256) -> predictor (same shape)
target: EMA copy of backbone -> projector (:class:`~sslstream.models.state.MomentumEncoder`),
        tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, updated after each optimizer step.
loss:   byol_loss(p1, z2') + byol_loss(p2, z1'), the paper's symmetrised sum (range [0, 8]).

``tau_base = 1`` keeps the target frozen at its random initialisation: the paper's
motivating experiment (a frozen random target still teaches the online network something).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import byol_mlp
from sslstream.models.methods.base import (
    Method,
    MethodConfig,
    Metrics,
    Momentum,
    MomentumPair,
    Width,
)
from sslstream.models.objectives import byol_loss
from sslstream.models.state import MomentumEncoder
from torch import nn


@dataclass(frozen=True, kw_only=True)
class BYOLConfig(MethodConfig):
    """The heads' widths and the target's tau schedule (values: conf/recipe/byol_*.yaml)."""

    name = "byol"
    proj_hidden_dim: Width
    proj_output_dim: Width
    pred_hidden_dim: Width
    tau_base: Momentum           # tau at k = 0; 1 freezes the target at its random init
    tau_final: Momentum = 1.0    # tau at k = K: tau_k = 1 - (1 - tau_base)(cos(pi k/K) + 1)/2
    sync_bn: bool = True         # cross-replica BN under multi-GPU DDP (CUDA only)


class BYOL(Method):
    config_class = BYOLConfig

    def __init__(self, backbone: nn.Module, config: BYOLConfig, *,
                 process_group: Any = None) -> None:
        super().__init__(backbone, config, process_group=process_group)
        c = config
        self.projector = byol_mlp(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim)
        self.predictor = byol_mlp(c.proj_output_dim, c.pred_hidden_dim, c.proj_output_dim)
        self.momentum = MomentumEncoder(nn.Sequential(self.backbone, self.projector),
                                        tau_base=c.tau_base, tau_final=c.tau_final)

    @property
    def momentum_pairs(self) -> list[MomentumPair]:
        return [MomentumPair((self.backbone, self.projector), self.momentum)]

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = self.momentum(view1), self.momentum(view2)  # no grad; target in train mode
        loss = byol_loss(p1, t2).loss + byol_loss(p2, t1).loss
        metrics = {"loss": loss.detach(), "tau": self.momentum.last_tau.clone(),
                   "embeddings": z1.detach()}
        return loss, metrics
