"""BYOL (Grill et al. 2020): an online network predicts an EMA target's projection.

online: backbone -> projector (4096-BN-ReLU-256) -> predictor (same shape)
target: EMA copy of backbone -> projector (:class:`~models.state.MomentumEncoder`),
        tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2, updated after each optimizer step.
loss:   byol_loss(p1, z2') + byol_loss(p2, z1'), the paper's symmetrised sum (range [0, 8]).

``tau_base = 1`` keeps the target frozen at its random initialisation: the paper's
motivating experiment (a frozen random target still teaches the online network something).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn

from models.heads import byol_mlp
from models.methods.base import Method, MethodConfig, Metrics
from models.objectives import byol_loss
from models.state import MomentumEncoder


class BYOL(Method):
    name = "byol"

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int = 4096,
                 proj_output_dim: int = 256, pred_hidden_dim: int = 4096,
                 tau_base: float = 0.99, tau_final: float = 1.0, sync_bn: bool = True,
                 process_group: Any = None) -> None:
        super().__init__(backbone, sync_bn=sync_bn, process_group=process_group)
        self.projector = byol_mlp(self.feature_dim, proj_hidden_dim, proj_output_dim)
        self.predictor = byol_mlp(proj_output_dim, pred_hidden_dim, proj_output_dim)
        self.momentum = MomentumEncoder(nn.Sequential(self.backbone, self.projector),
                                        tau_base=tau_base, tau_final=tau_final)

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module,
                    process_group: Any = None) -> BYOL:
        return cls(backbone, proj_hidden_dim=cfg.int("proj_hidden_dim"),
                   proj_output_dim=cfg.int("proj_output_dim"),
                   pred_hidden_dim=cfg.int("pred_hidden_dim"),
                   tau_base=cfg.float("tau_base"), tau_final=float(cfg.opt("tau_final", 1.0)),
                   sync_bn=bool(cfg.opt("sync_bn", True)), process_group=process_group)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        t1, t2 = self.momentum(view1), self.momentum(view2)  # no grad; target in train mode
        loss = byol_loss(p1, t2) + byol_loss(p2, t1)
        metrics = {"loss": loss.detach(), "tau": self.momentum.last_tau.clone(),
                   "embeddings": z1.detach()}
        return loss, metrics

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        online = itertools.chain(self.backbone.parameters(), self.projector.parameters())
        self.momentum.update(online, total_steps)
