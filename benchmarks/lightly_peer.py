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

DINO and SwaV: the same benchmark file at lightly's head (e8d317fc, 2026-08; its models are
0351a522's, its transforms now the lightly.transforms classes with cj_strength=0.5 named):
- DINO: DINOTransform(global_crop_size=32, n_local_views=0, cj_strength=0.5, no blur): two
  global crops at scale (0.4, 1), bicubic, solarisation 0.2 on the second; a
  DINOProjectionHead(512, 2048, 256, 2048, batch_norm=True) whose MLP is replaced by two
  layers (512 -> 2048 BN GELU -> 256, default init); a teacher backbone deep-copied from the
  student, a teacher head built anew (its own random weights, as the benchmark does); both
  updated with constant momentum 0.99 before each step; DINOLoss(output_dim=2048) at its
  defaults (teacher 0.04 throughout, student 0.1, center momentum 0.9); SGD on the student's
  backbone and head, lr 0.06 x batch/128, momentum 0.9, wd 5e-4, cosine. No last-layer freeze
  (the benchmark never cancels the last layer's gradients).
- SwaV: SwaVTransform(crop_sizes=[32], crop_counts=[2], crop_min_scales=[0.14],
  cj_strength=0.5, no blur) -- lightly 1.5.26 rejects that call as written (crop_max_scales
  keeps its two-entry default (1.0, 0.14)), so crop_max_scales=[1.0], its first entry;
  SwaVProjectionHead(512, 512, 128), SwaVPrototypes(128, 512) normalised before each step,
  features L2-normalised; SwaVLoss() (temperature 0.1, 3 Sinkhorn iterations, epsilon 0.05);
  no queue, no prototype freezing; Adam lr 1e-3 x batch/128, wd 1e-6, cosine.

MoCo v3 is in no lightly benchmark or example; built from lightly's modules as its maintainers
advise (lightly#1190: the MoCo v2 recipe with v3 head sizes, a prediction head, no memory
bank): the benchmark's SimCLRTransform views and SGD recipe (as its MoCo v2);
MoCoProjectionHead(512, 4096, 256, num_layers=2, batch_norm=True) as projector (lightly's
v3 sizes and BN; 2 layers as the official moco-v3 builder's MoCo_ResNet, 3 is its ViT
variant), MoCoProjectionHead(256, 4096, 256, num_layers=2, batch_norm=True) as predictor;
a momentum copy of backbone and projector, momentum cosine_schedule(step, steps, 0.99, 1.0)
(moco-v3's ResNet value and per-step cosine; lightly's reaches 1.0 at the last step);
NTXentLoss(temperature=0.2, memory_bank_size=0) symmetrised as 0.5 (L(q1, k2) + L(q2, k1))
like the benchmark's MoCo v2.
Temperature 0.2 is the MoCo v3 paper's and solo-learn's CIFAR value (moco-v3's ResNet-50
script keeps 1.0). NTXentLoss without a bank is SimCLR's 2N-way loss: each query also has
the other queries as negatives, and no 2T scale (MoCo v3's InfoNCE has only the keys).

Only lightly.loss / lightly.models / lightly.transforms / lightly.utils are imported
(lightly.data does not import with this torchvision). `pip install -e .[bench]`.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import torch
from torch import nn

PEER_METHODS = ("byol", "simclr", "mocov2", "simsiam", "vicreg", "barlow_twins", "dino", "swav", "mocov3")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def peer_transform(method: str) -> Callable:
    """PIL image -> list of view tensors (two for every method here), lightly's CIFAR-10
    benchmark views."""
    from lightly.transforms import DINOTransform, SimCLRTransform, SwaVTransform, VICRegTransform

    if method == "vicreg":
        return VICRegTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)
    if method == "dino":
        return DINOTransform(global_crop_size=32, n_local_views=0, cj_strength=0.5,
                             gaussian_blur=(0.0, 0.0, 0.0))
    if method == "swav":
        return SwaVTransform(crop_sizes=[32], crop_counts=[2], crop_min_scales=[0.14],
                             crop_max_scales=[1.0], cj_strength=0.5, gaussian_blur=0.0)
    return SimCLRTransform(input_size=32, cj_strength=0.5, gaussian_blur=0.0)


def _dino_head(feat: int) -> nn.Module:
    """The benchmark's CIFAR DINO head: DINOProjectionHead with a 2-layer MLP."""
    from lightly.models.modules import heads

    head = heads.DINOProjectionHead(feat, 2048, 256, 2048, batch_norm=True)
    head.layers = heads.ProjectionHead([
        (feat, 2048, nn.BatchNorm1d(2048), nn.GELU()),
        (2048, 256, None, None),
    ]).layers
    return head


class PeerModel(nn.Module):
    """One lightly benchmark model: `loss(views, step)`; `embed` (the student's backbone) for
    the kNN. `total_steps` and `steps_per_epoch` drive the schedules lightly keys to the step
    or epoch (MoCo v3's momentum, DINO's teacher temperature)."""

    def __init__(self, method: str, backbone: nn.Module, feat: int, total_steps: int = 1,
                 steps_per_epoch: int = 1) -> None:
        super().__init__()
        from lightly.loss import (
            BarlowTwinsLoss,
            DINOLoss,
            NegativeCosineSimilarity,
            NTXentLoss,
            SwaVLoss,
            VICRegLoss,
        )
        from lightly.models.modules import heads
        from lightly.models.utils import deactivate_requires_grad

        self.method = method
        self.backbone = backbone
        self.total_steps = total_steps
        self.steps_per_epoch = steps_per_epoch
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
        elif method == "dino":
            self.projection_head = _dino_head(feat)
            self.criterion = DINOLoss(output_dim=2048)
        elif method == "swav":
            self.projection_head = heads.SwaVProjectionHead(feat, 512, 128)
            self.prototypes = heads.SwaVPrototypes(128, 512)
            self.criterion = SwaVLoss()
        elif method == "mocov3":
            self.projection_head = heads.MoCoProjectionHead(feat, 4096, 256, num_layers=2, batch_norm=True)
            self.prediction_head = heads.MoCoProjectionHead(256, 4096, 256, num_layers=2, batch_norm=True)
            self.criterion = NTXentLoss(temperature=0.2, memory_bank_size=0)
        else:
            raise ValueError(f"lightly has no {method!r} method (margin contrastive: none)")
        if method in ("byol", "mocov2", "mocov3", "dino"):
            # DINO's teacher head is a second, independently initialised head (the benchmark
            # builds it anew); the other teachers copy the student
            self.momentum = nn.ModuleDict({
                "backbone": copy.deepcopy(self.backbone),
                "projection_head": _dino_head(feat) if method == "dino"
                else copy.deepcopy(self.projection_head),
            })
            deactivate_requires_grad(self.momentum)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).flatten(1)

    def _update_momentum(self, m: float) -> None:
        from lightly.models.utils import update_momentum

        assert self.momentum is not None
        update_momentum(self.backbone, self.momentum["backbone"], m)
        update_momentum(self.projection_head, self.momentum["projection_head"], m)

    def _teacher(self, x: torch.Tensor) -> torch.Tensor:
        assert self.momentum is not None
        with torch.no_grad():
            return self.momentum["projection_head"](self.momentum["backbone"](x).flatten(1))

    def loss(self, views: list[torch.Tensor], step: int = 0) -> torch.Tensor:
        """The training loss of one batch of `views` at 0-based optimiser `step`; moves the
        momentum encoder first, where the method has one (as lightly's benchmark does)."""
        m = self.method
        if m == "dino":
            self._update_momentum(0.99)
            teacher_out = [self._teacher(v) for v in views[:2]]
            student_out = [self.projection_head(self.embed(v)) for v in views]
            return self.criterion(teacher_out, student_out, epoch=step // self.steps_per_epoch)
        if m == "swav":
            self.prototypes.normalize()
            out = [self.prototypes(nn.functional.normalize(self.projection_head(self.embed(v)), dim=1))
                   for v in views]
            return self.criterion(out[:2], out[2:])
        x0, x1 = views
        if m == "byol":  # momentum updated before the step, constant 0.99 (benchmark)
            self._update_momentum(0.99)
            p0 = self.prediction_head(self.projection_head(self.embed(x0)))
            p1 = self.prediction_head(self.projection_head(self.embed(x1)))
            z0, z1 = self._teacher(x0), self._teacher(x1)
            return 0.5 * (self.criterion(p0, z1) + self.criterion(p1, z0))
        if m == "mocov3":
            from lightly.utils.scheduler import cosine_schedule

            self._update_momentum(cosine_schedule(step, self.total_steps, 0.99, 1.0))
            q0 = self.prediction_head(self.projection_head(self.embed(x0)))
            q1 = self.prediction_head(self.projection_head(self.embed(x1)))
            k0, k1 = self._teacher(x0), self._teacher(x1)
            return 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        if m == "mocov2":
            from lightly.models.utils import batch_shuffle, batch_unshuffle

            self._update_momentum(0.99)

            def pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                b, shuffle = batch_shuffle(b)
                q = self.projection_head(self.embed(a))
                return q, batch_unshuffle(self._teacher(b), shuffle)

            return 0.5 * (self.criterion(*pair(x0, x1)) + self.criterion(*pair(x1, x0)))
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
    elif m == "swav":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3 * batch / 128, weight_decay=1e-6)
        warmup = 0
    else:  # DINO: the student's backbone and head; the teacher and the loss's center excluded
        params = [p for n, p in model.named_parameters() if not n.startswith("momentum.")]
        lr = 6e-2 if m == "simsiam" else 6e-2 * batch / 128
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
        warmup = 0

    def factor(k: int) -> float:
        if k < warmup:
            return (k + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (k - warmup) / max(1, total_steps - warmup)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)
