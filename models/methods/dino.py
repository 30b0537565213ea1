"""DINO (Caron et al. 2021): a student distils a momentum teacher over multi-crop views.

student: backbone -> :class:`~sslstream.models.heads.DINOHead` (MLP - L2-normalised
         bottleneck - weight-normalised last layer of ``out_dim`` logits), over every crop
         (one backbone call per crop size, :func:`forward_by_size`)
teacher: EMA copy of backbone + head (:class:`~sslstream.models.state.MomentumEncoder`),
         tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (0.996 -> 1), over the two global
         crops only; no stochastic depth (the official teacher is built without it)
center:  :class:`~sslstream.models.state.DINOCenter`, an EMA (0.9) of the teacher's mean
         output over the global batch (all-reduced: exact under DDP), updated after the loss
loss:    dino_loss: cross-entropy of every student crop against every other global crop's
         centred teacher softmax at ``teacher_temperature(epoch)`` (linear warm-up from
         ``warmup_teacher_temp`` over ``warmup_teacher_temp_epochs``, then ``teacher_temp``),
         student softmax at ``student_temp``

The last layer's gradients are dropped during the first ``freeze_last_layer_epochs`` epochs
(:meth:`DINO.after_backward`). Sources: the paper (arXiv 2104.14294) and
facebookresearch/dino ``main_dino.py`` (``DINOLoss``, ``cancel_gradients_last_layer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from sslstream.conf.typed import Ge
from sslstream.models.backbones import without_drop_path
from sslstream.models.heads import DINOHead
from sslstream.models.methods.base import (
    Method,
    MethodConfig,
    Metrics,
    Momentum,
    MomentumPair,
    Positive,
    Width,
)
from sslstream.models.methods.multicrop import forward_by_size
from sslstream.models.objectives import dino_loss, teacher_temperature
from sslstream.models.state import DINOCenter, MomentumEncoder
from torch import nn

Epochs = Annotated[int, Ge(0)]


@dataclass(frozen=True, kw_only=True)
class DINOConfig(MethodConfig):
    """Head, temperatures, center and teacher momentum (values: conf/recipe/dino_*.yaml)."""

    name = "dino"
    proj_hidden_dim: Width           # the head MLP's hidden width (2048)
    proj_output_dim: Width           # the L2-normalised bottleneck (256)
    out_dim: Width                   # K, the last layer's logits (65536 in the paper)
    num_layers: Width = 3            # Linear layers of the head MLP, bottleneck included
    use_bn_in_head: bool = False     # BN after the hidden layers (off for ViTs, as the paper)
    norm_last_layer: bool = True     # freeze the weight norm's g at 1 (unit-norm rows)
    freeze_last_layer_epochs: Epochs = 1  # epochs whose last-layer gradients are dropped
    student_temp: Positive = 0.1
    teacher_temp: Positive = 0.04    # after the warm-up (0.07 for longer runs)
    warmup_teacher_temp: Positive = 0.04
    warmup_teacher_temp_epochs: Epochs = 0
    center_momentum: Momentum = 0.9
    tau_base: Momentum = 0.996       # teacher EMA at k = 0, cosine to tau_final
    tau_final: Momentum = 1.0
    sync_bn: bool = True             # cross-replica BN under multi-GPU DDP (CUDA only)


class DINO(Method):
    config_class = DINOConfig
    config: DINOConfig
    multi_crop = True

    def __init__(self, backbone: nn.Module, config: DINOConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.head = DINOHead(self.feature_dim, c.out_dim, c.proj_hidden_dim, c.proj_output_dim,
                             c.num_layers, use_bn=c.use_bn_in_head,
                             norm_last_layer=c.norm_last_layer,
                             freeze_last_layer=c.freeze_last_layer_epochs)
        self.momentum = MomentumEncoder(nn.Sequential(self.backbone, self.head),
                                        tau_base=c.tau_base, tau_final=c.tau_final)
        without_drop_path(self.momentum.target)
        self.center = DINOCenter(c.out_dim, c.center_momentum, process_group=process_group)

    @property
    def momentum_pairs(self) -> list[MomentumPair]:
        return [MomentumPair((self.backbone, self.head), self.momentum)]

    def teacher_temp(self) -> float:
        """The teacher temperature of the current epoch (:meth:`set_epoch`)."""
        c = self.config
        return teacher_temperature(self.epoch, c.teacher_temp, c.warmup_teacher_temp,
                                   c.warmup_teacher_temp_epochs)

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        c = self.config
        n = views[0].shape[0]
        bottleneck = self.head.bottleneck(forward_by_size(self.backbone, views))
        student = self.head.last_layer(bottleneck).split(n)
        teacher = self.momentum(torch.cat(list(views[:2]))).split(n)  # no grad
        temp = self.teacher_temp()
        loss, parts = dino_loss(student, teacher, self.center.center, teacher_temp=temp,
                                student_temp=c.student_temp)
        self.center.update(teacher)  # after the loss, as the official DINOLoss.forward
        metrics = {"loss": loss.detach(), "tau": self.momentum.last_tau.clone(),
                   "teacher_temp": temp, **parts, "embeddings": bottleneck[:n].detach()}
        return loss, metrics

    def after_backward(self, epoch: int) -> None:
        """Drop the last layer's gradients during the first ``freeze_last_layer_epochs``."""
        self.head.cancel_last_layer_gradients(epoch)
