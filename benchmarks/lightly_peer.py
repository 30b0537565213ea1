"""The peer column of benchmarks/quality_cpu.py: each method as lightly's CIFAR-10 benchmark
builds and trains it, around a backbone object we hand in.

Source of every value below: lightly's `docs/source/getting_started/benchmarks/
cifar10_benchmark.py` (commit 0351a522, ResNet-18 at batch 128, 200 epochs): every model
takes SimCLRCollateFunction(input_size=32, gaussian_blur=0) views (cj_strength 0.5,
min_scale 0.08, grayscale 0.2, flip 0.5, ImageNet mean/std; here the identical
`SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)`), SGD lr 0.06 x
batch/128, momentum 0.9, weight decay 5e-4 and a cosine schedule without warmup (SimSiam:
lr 0.06 unscaled). Heads keep lightly's hidden sizes with our backbone's feature width as
input (lightly's ResNet-18 gives 512). VICReg is not in that file; its recipe is lightly's
later benchmark's (BarlowTwinsProjectionHead(512, 2048, 2048), VICRegLoss(), LARS lr 0.3 x
batch/256, wd 1e-4, momentum 0.9, warmup 10% of the run; VICRegTransform views).
lightly has no margin-contrastive method.

Only lightly.loss / lightly.models / lightly.transforms / lightly.utils are imported
(lightly.data does not import with this torchvision). `pip install -e .[bench]`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

PEER_METHODS = ("byol", "simclr", "mocov2", "simsiam", "vicreg", "barlow_twins")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def peer_transform(method: str) -> Callable:
    """PIL image -> [view1, view2] tensors, lightly's CIFAR-10 benchmark views."""
    from lightly.transforms import SimCLRTransform, VICRegTransform

    if method == "vicreg":
        return VICRegTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    return SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)


class PeerModel(nn.Module):
    """One lightly benchmark model: `loss(x0, x1)` and `after_step()`; `embed` for the kNN."""

    def __init__(self, method: str, backbone: nn.Module, feat: int) -> None:
        super().__init__()
        from lightly.loss import BarlowTwinsLoss, NegativeCosineSimilarity, NTXentLoss, VICRegLoss
        from lightly.models.modules import heads
        from lightly.models.utils import deactivate_requires_grad

        self.method = method
        self.backbone = backbone
        self.momentum: nn.ModuleDict | None = None
        if method == "byol":
            self.projection_head = heads.BYOLProjectionHead(feat, 1024, 256)
            self.prediction_head = heads.BYOLPredictionHead(256, 1024, 256)
            self.criterion = NegativeCosineSimilarity()
        elif method == "simclr":
            self.projection_head = heads.SimCLRProjectionHead(feat, feat, 128)
            self.criterion = NTXentLoss()
        elif method == "mocov2":
            self.projection_head = heads.MoCoProjectionHead(feat, feat, 128)
            self.criterion = NTXentLoss(temperature=0.1, memory_bank_size=(4096, 128))
        elif method == "simsiam":
            self.projection_head = heads.ProjectionHead([
                (feat, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                (2048, 2048, nn.BatchNorm1d(2048), None),
            ])
            self.prediction_head = heads.SimSiamPredictionHead(2048, 512, 2048)
            self.criterion = NegativeCosineSimilarity()
        elif method == "barlow_twins":
            self.projection_head = heads.ProjectionHead([
                (feat, 2048, nn.BatchNorm1d(2048), nn.ReLU(inplace=True)),
                (2048, 2048, None, None),
            ])
            self.criterion = BarlowTwinsLoss()
        elif method == "vicreg":
            self.projection_head = heads.BarlowTwinsProjectionHead(feat, 2048, 2048)
            self.criterion = VICRegLoss()
        else:
            raise ValueError(f"lightly has no {method!r} method (margin contrastive: none)")
        if method in ("byol", "mocov2"):
            self.momentum = nn.ModuleDict({
                "backbone": copy.deepcopy(self.backbone),
                "projection_head": copy.deepcopy(self.projection_head),
            })
            deactivate_requires_grad(self.momentum)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)

    def _update_momentum(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        assert self.momentum is not None
        update_momentum(self.backbone, self.momentum["backbone"], m)
        update_momentum(self.projection_head, self.momentum["projection_head"], m)

    def loss(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        m = self.method
        if m == "byol":  # momentum updated before the step, constant 0.99 (benchmark)
            self._update_momentum(0.99)
            p0 = self.prediction_head(self.projection_head(self.embed(x0)))
            p1 = self.prediction_head(self.projection_head(self.embed(x1)))
            assert self.momentum is not None
            with torch.no_grad():
                z0 = self.momentum["projection_head"](self.momentum["backbone"](x0).flatten(1))
                z1 = self.momentum["projection_head"](self.momentum["backbone"](x1).flatten(1))
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        if m == "mocov2":
            from lightly.models.utils import batch_shuffle, batch_unshuffle

            self._update_momentum(0.99)
            assert self.momentum is not None

            def step(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                b, shuffle = batch_shuffle(b)
                q = self.projection_head(self.embed(a))
                with torch.no_grad():
                    k = self.momentum["projection_head"](self.momentum["backbone"](b).flatten(1))
                return q, batch_unshuffle(k, shuffle)

            return 0.5 * (self.criterion(*step(x0, x1)) + self.criterion(*step(x1, x0)))
        if m == "simsiam":
            z0 = self.projection_head(self.embed(x0))
            z1 = self.projection_head(self.embed(x1))
            p0, p1 = self.prediction_head(z0), self.prediction_head(z1)
            return 0.5 * (self.criterion(z0.detach(), p1) + self.criterion(z1.detach(), p0))
        z0 = self.projection_head(self.embed(x0))
        z1 = self.projection_head(self.embed(x1))
        return self.criterion(z0, z1)


def peer_optimizer(model: PeerModel, batch: int, total_steps: int):
    """(optimizer, per-step lr factor) of lightly's CIFAR-10 benchmark recipe, with its
    per-epoch cosine stretched over the step budget."""
    m = model.method
    if m == "vicreg":
        from lightly.utils.lars import LARS

        opt = LARS(model.parameters(), lr=0.3 * batch / 256, weight_decay=1e-4, momentum=0.9)
        warmup = max(1, total_steps // 10)
    else:
        params = [p for n, p in model.named_parameters() if not n.startswith("momentum.")]
        lr = 6e-2 if m == "simsiam" else 6e-2 * batch / 128
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        warmup = 0

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total_steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
