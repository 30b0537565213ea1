"""SimSiam (Chen & He 2021): BYOL without the momentum target; a stop-gradient does the work.

online: backbone -> projector (3 x Linear-BN, BN without affine on the output) -> predictor
        (bottleneck 2048-512-2048)
loss:   (D(p1, sg(z2)) + D(p2, sg(z1))) / 2 with D = -cosine (range [-1, 1])

``stop_gradient: false`` removes the stop-gradient: the paper's Fig. 2 experiment, which
collapses at once (loss -> -1, std of the normalised output -> 0). ``fix_pred_lr: true``
flags the predictor's optimiser groups ``fixed_lr`` (no lr decay), as the paper does.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from sslstream.models.heads import simsiam_predictor, simsiam_projector
from sslstream.models.methods.base import Method, MethodConfig, Metrics, Width, split_param_groups
from sslstream.models.objectives import simsiam_loss
from torch import nn


@dataclass(frozen=True, kw_only=True)
class SimSiamConfig(MethodConfig):
    """Hyper-parameters (values: conf/recipe/simsiam_*.yaml)."""

    name = "simsiam"
    proj_hidden_dim: Width
    proj_output_dim: Width
    pred_hidden_dim: Width
    proj_layers: Width = 3
    proj_last_bn: bool = True    # BN (no affine) on the projector output, as the paper
    stop_gradient: bool = True   # false: the paper's collapse experiment (Fig. 2)
    fix_pred_lr: bool = True     # the predictor keeps its initial lr
    sync_bn: bool = True


class SimSiam(Method):
    config_class = SimSiamConfig

    def __init__(self, backbone: nn.Module, config: SimSiamConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = simsiam_projector(self.feature_dim, c.proj_hidden_dim,
                                           c.proj_output_dim, c.proj_layers,
                                           last_bn=c.proj_last_bn)
        self.predictor = simsiam_predictor(c.proj_output_dim, c.pred_hidden_dim,
                                           c.proj_output_dim)
        self.stop_gradient = c.stop_gradient
        self.fix_pred_lr = c.fix_pred_lr

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        z2 = self.projector(self.backbone(view2))
        p1, p2 = self.predictor(z1), self.predictor(z2)
        sg = self.stop_gradient
        loss = 0.5 * (simsiam_loss(p1, z2, stop_gradient=sg).loss
                      + simsiam_loss(p2, z1, stop_gradient=sg).loss)
        return loss, {"loss": loss.detach(), "embeddings": z1.detach()}

    def parameter_groups(self) -> list[dict[str, Any]]:
        encoder = itertools.chain(self.backbone.named_parameters(),
                                  self.projector.named_parameters())
        return [*split_param_groups(encoder, "encoder"),
                *split_param_groups(self.predictor.named_parameters(), "predictor",
                                    fixed_lr=self.fix_pred_lr)]
