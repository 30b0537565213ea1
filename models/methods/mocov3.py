"""MoCo v3 (Chen, Xie & He 2021): queries predict a momentum encoder's keys, no queue.

query encoder: backbone -> projector (:func:`~sslstream.models.heads.mocov3_projector`: no
               biases, BN everywhere, affine-free output BN; 2 layers for a ResNet, 3 for a
               ViT) -> predictor (2 layers; output BN on ViTs only, as the official builder)
key encoder:   EMA copy of backbone + projector
               (:class:`~sslstream.models.state.MomentumEncoder`), tau cosine from
               ``tau_base`` (0.99) to 1, moved after each optimizer step
loss:          mocov3_loss(q1, q2, k1, k2): ctr(q1, k2) + ctr(q2, k1), each an InfoNCE over
               the keys of the GLOBAL batch (gathered from every rank without gradient) times
               2T, as the official ``contrastive_loss``

The ViT stabiliser of the paper (Sec. 4.2, a frozen random patch projection) is the
backbone's ``freeze_patch_embed`` key (models/backbones.py: ViT), set by the ViT recipe.
Sources: the paper (arXiv 2104.02057) and facebookresearch/moco-v3 ``moco/builder.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import mocov3_predictor, mocov3_projector
from sslstream.models.methods.base import (
    Method,
    MethodConfig,
    Metrics,
    Momentum,
    MomentumPair,
    Positive,
    Width,
)
from sslstream.models.objectives import mocov3_loss
from sslstream.models.state import MomentumEncoder
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MoCoV3Config(MethodConfig):
    """Heads, temperature and key-encoder momentum (values: conf/recipe/mocov3_*.yaml)."""

    name = "mocov3"
    proj_hidden_dim: Width           # 4096
    proj_output_dim: Width           # 256
    pred_hidden_dim: Width           # 4096
    proj_num_layers: Width = 2       # 2 for a ResNet, 3 for a ViT (official builder)
    pred_last_bn: bool = False       # the predictor's output BN (official: ViT only)
    temperature: Positive            # 1.0 for a ResNet-50, 0.2 for ViTs and CIFAR
    tau_base: Momentum               # 0.99; 0.996 for 1000-epoch runs
    tau_final: Momentum = 1.0
    gather: bool = True              # keys of every rank as negatives (no gradient)
    sync_bn: bool = True             # cross-replica BN under multi-GPU DDP (CUDA only)


class MoCoV3(Method):
    config_class = MoCoV3Config
    config: MoCoV3Config

    def __init__(self, backbone: nn.Module, config: MoCoV3Config, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = mocov3_projector(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim,
                                          c.proj_num_layers)
        self.predictor = mocov3_predictor(c.proj_output_dim, c.pred_hidden_dim,
                                          c.proj_output_dim, last_bn=c.pred_last_bn)
        self.momentum = MomentumEncoder(nn.Sequential(self.backbone, self.projector),
                                        tau_base=c.tau_base, tau_final=c.tau_final)

    @property
    def momentum_pairs(self) -> list[MomentumPair]:
        return [MomentumPair((self.backbone, self.projector), self.momentum)]

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        k1, k2 = self.momentum(view1), self.momentum(view2)  # no grad
        loss, _ = mocov3_loss(q1, q2, k1, k2, self.config.temperature,
                              group=self.process_group, gather=self.config.gather)
        metrics = {"loss": loss.detach(), "tau": self.momentum.last_tau.clone(),
                   "embeddings": z1.detach()}
        return loss, metrics
