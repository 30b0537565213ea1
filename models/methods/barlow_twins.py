"""Barlow Twins (Zbontar et al. 2021): drive the views' cross-correlation to the identity.

online: backbone -> projector (3 layers, 8192 wide in the paper, no biases)
loss:   scale_loss * (on_diag + lambd * off_diag) over the global batch.

``scale_loss`` is solo-learn's CIFAR factor (0.1); 1.0 is the paper. ``bias_lr_mult``
multiplies the lr of biases and norm parameters (the paper: 0.0048 / 0.2 = 0.024).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.heads import barlow_projector
from models.methods.base import Method, MethodConfig, Metrics, split_param_groups
from models.objectives import barlow_twins_loss


class BarlowTwins(Method):
    name = "barlow_twins"

    def __init__(self, backbone: nn.Module, *, proj_hidden_dim: int = 8192,
                 proj_output_dim: int = 8192, proj_layers: int = 3, lambd: float = 0.0051,
                 scale_loss: float = 1.0, bias_lr_mult: float = 1.0, gather: bool = True,
                 sync_bn: bool = True, process_group: Any = None) -> None:
        super().__init__(backbone, sync_bn=sync_bn, process_group=process_group)
        self.projector = barlow_projector(self.feature_dim, proj_hidden_dim, proj_output_dim,
                                          proj_layers)
        self.lambd = float(lambd)
        self.scale_loss = float(scale_loss)
        self.bias_lr_mult = float(bias_lr_mult)
        self.gather = bool(gather)

    @classmethod
    def from_config(cls, cfg: MethodConfig, backbone: nn.Module,
                    process_group: Any = None) -> BarlowTwins:
        return cls(backbone, proj_hidden_dim=cfg.int("proj_hidden_dim"),
                   proj_output_dim=cfg.int("proj_output_dim"),
                   proj_layers=int(cfg.opt("proj_layers", 3)), lambd=cfg.float("lambd"),
                   scale_loss=float(cfg.opt("scale_loss", 1.0)),
                   bias_lr_mult=float(cfg.opt("bias_lr_mult", 1.0)),
                   gather=bool(cfg.opt("gather", True)),
                   sync_bn=bool(cfg.opt("sync_bn", True)), process_group=process_group)

    def training_step(self, view1: torch.Tensor,
                      view2: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        loss, parts = barlow_twins_loss(z1, z2, self.lambd, group=self.process_group,
                                        gather=self.gather, return_parts=True)
        loss = self.scale_loss * loss
        return loss, {"loss": loss.detach(), **parts, "embeddings": z1.detach()}

    def parameter_groups(self) -> list[dict[str, Any]]:
        groups = split_param_groups(self.named_parameters(), self.name)
        for g in groups:
            if g["lars_exclude"]:
                g["lr_mult"] = self.bias_lr_mult
        return groups
