"""Projector / predictor MLPs in the shapes the papers use (widths come from config).

Every head is :func:`mlp`: ``num_layers`` Linear layers, each hidden one followed by
(optionally) BatchNorm1d and ReLU. The paper shapes differ only in where BN and biases sit:

========================  ==================================================================
SimCLR projector          Linear-BN-ReLU-Linear (2 layers; SimCLR code puts BN in the hidden
                          layer; the paper's output is 128-d)
MoCo v2 projector         Linear-ReLU-Linear (2 layers, no BN: moco/builder.py)
BYOL projector/predictor  Linear(4096)-BN-ReLU-Linear(256), no BN after the last layer
SimSiam projector         3 x Linear(bias=False)-BN, ReLU between, BN(affine=False) on the
                          output (the official code keeps fc's bias but freezes it: it is
                          cancelled by the BN that follows, so we omit it)
SimSiam predictor         Linear(2048->512, bias=False)-BN-ReLU-Linear(512->2048): a bottleneck
VICReg expander           Linear(8192)-BN-ReLU x 2 then Linear(8192) (3 layers)
Barlow Twins projector    like VICReg, no biases (the loss standardises the output itself)
MoCo v3 projector         3 x Linear(bias=False)-BN, ReLU between, BN(affine=False) on the
                          output (4096 hidden, 256 out; the official ResNet-50 code: 2 layers)
MoCo v3 predictor         Linear(4096, bias=False)-BN-ReLU-Linear(256, bias=False); the ViT
                          predictor adds BN(affine=False) on the output
SwAV projector            Linear(2048)-BN-ReLU-Linear(128); then L2-normalised and scored by
                          :class:`SwAVPrototypes` (3000 unit-norm prototypes, no bias)
DINO head                 :class:`DINOHead`: (Linear-GELU) x 2 - Linear(256) bottleneck,
                          L2-normalised, then a weight-normalised Linear(65536, bias=False)
========================  ==================================================================

The DINO head's last layer and SwAV's prototypes are frozen for the first epoch (the papers'
stabiliser): :func:`cancel_gradients`, called by the trainer after backward and before the
optimizer step, drops their gradients while ``epoch < freeze_epochs``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

__all__ = [
    "DINOHead",
    "SwAVPrototypes",
    "barlow_projector",
    "byol_mlp",
    "cancel_gradients",
    "mlp",
    "moco_projector",
    "mocov3_predictor",
    "mocov3_projector",
    "simclr_projector",
    "simsiam_predictor",
    "simsiam_projector",
    "swav_projector",
    "vicreg_expander",
]


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    *,
    hidden_bn: bool = True,
    hidden_bias: bool = True,
    last_bias: bool = True,
    last_bn: bool = False,
    last_bn_affine: bool = True,
) -> nn.Sequential:
    """``num_layers`` Linear layers: ``in -> hidden -> ... -> hidden -> out``.

    Hidden layers are ``Linear[-BN]-ReLU``; the last layer is ``Linear[-BN]``. ``num_layers=1``
    is a single Linear (``hidden_dim`` unused).
    """
    for label, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        if int(value) < 1:
            raise ValueError(f"head {label} must be >= 1, got {value}")
    if num_layers < 1:
        raise ValueError(f"head num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = int(in_dim)
    for _ in range(num_layers - 1):
        # A Linear followed by BN does not need a bias (BN's shift replaces it).
        layers.append(nn.Linear(dim, hidden_dim, bias=hidden_bias and not hidden_bn))
        if hidden_bn:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = int(hidden_dim)
    layers.append(nn.Linear(dim, out_dim, bias=last_bias))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=last_bn_affine))
    return nn.Sequential(*layers)


def simclr_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128,
                     num_layers: int = 2, bn: bool = True) -> nn.Sequential:
    """SimCLR's projection head g(.): Linear-BN-ReLU-Linear."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=bn)


def moco_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128,
                   num_layers: int = 2) -> nn.Sequential:
    """MoCo v2's MLP head: Linear-ReLU-Linear, no BN (BN would leak batch statistics, which
    is what MoCo's shuffle-BN guards the key encoder against)."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=False)


def byol_mlp(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256,
             num_layers: int = 2) -> nn.Sequential:
    """BYOL's projector and predictor: Linear(4096)-BN-ReLU-Linear(256), no final BN."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=True)


def simsiam_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 2048,
                      num_layers: int = 3, last_bn: bool = True) -> nn.Sequential:
    """SimSiam's projector: BN on every layer, the output BN without affine parameters.

    ``last_bn=False`` drops the output BN (the paper's Table 2 ablation): the output can then
    collapse to a constant, which the output BN (zero mean, unit variance per dimension)
    rules out -- there collapse shows as a falling effective rank instead.
    """
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=True,
               last_bias=not last_bn, last_bn=last_bn, last_bn_affine=False)


def simsiam_predictor(in_dim: int = 2048, hidden_dim: int = 512,
                      out_dim: int = 2048) -> nn.Sequential:
    """SimSiam's bottleneck predictor h(.): Linear(512)-BN-ReLU-Linear(2048)."""
    return mlp(in_dim, hidden_dim, out_dim, 2, hidden_bn=True)


def vicreg_expander(in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192,
                    num_layers: int = 3) -> nn.Sequential:
    """VICReg's expander: (Linear-BN-ReLU) x 2 then Linear, 8192 wide in the paper."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=True, last_bias=False)


def barlow_projector(in_dim: int, hidden_dim: int = 8192, out_dim: int = 8192,
                     num_layers: int = 3) -> nn.Sequential:
    """Barlow Twins' projector: as VICReg's, without biases (official code)."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=True, hidden_bias=False,
               last_bias=False)


def mocov3_projector(in_dim: int, hidden_dim: int = 4096, out_dim: int = 256,
                     num_layers: int = 3) -> nn.Sequential:
    """MoCo v3's projector: no biases, BN on every layer, the output BN without affine
    parameters (SimCLR's design with gamma removed, as the official ``_build_mlp``). The
    paper's ViT head has 3 layers; the official ResNet-50 code uses 2."""
    return mlp(in_dim, hidden_dim, out_dim, num_layers, hidden_bn=True, last_bias=False,
               last_bn=True, last_bn_affine=False)


def mocov3_predictor(in_dim: int = 256, hidden_dim: int = 4096, out_dim: int = 256, *,
                     last_bn: bool = False) -> nn.Sequential:
    """MoCo v3's predictor: Linear-BN-ReLU-Linear, no biases; ``last_bn`` adds the output BN
    without affine parameters (the official ViT predictor has it, the ResNet one does not)."""
    return mlp(in_dim, hidden_dim, out_dim, 2, hidden_bn=True, last_bias=False, last_bn=last_bn,
               last_bn_affine=False)


def swav_projector(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """SwAV's projection head: Linear-BN-ReLU-Linear (the method L2-normalises the output)."""
    return mlp(in_dim, hidden_dim, out_dim, 2, hidden_bn=True)


def cancel_gradients(module: nn.Module, epoch: int, freeze_epochs: int) -> bool:
    """Drop (set to ``None``) the gradients of ``module``'s parameters while
    ``epoch < freeze_epochs``; returns whether it did.

    Call it after backward and before the optimizer step (under DDP: after the gradients
    were averaged; every rank drops the same ones). A parameter without gradient is skipped
    by the optimizer, weight decay and momentum included, as in the official DINO
    (``cancel_gradients_last_layer``) and SwAV (``freeze_prototypes_niters``) code.
    """
    if epoch >= freeze_epochs:
        return False
    for p in module.parameters():
        p.grad = None
    return True


class SwAVPrototypes(nn.Module):
    """SwAV's prototypes: K unit vectors; scores = z @ C^T for L2-normalised projections z.

    :meth:`normalize_` re-projects the prototypes onto the unit sphere; the method calls it
    before every forward (the official training loop does, under ``no_grad``).
    ``freeze_epochs`` (1 in the paper: ``freeze_prototypes_niters`` = 313 iterations, one
    ImageNet epoch at batch 4096) is read by :meth:`cancel_gradients`.
    """

    def __init__(self, dim: int, n_prototypes: int = 3000, freeze_epochs: int = 1) -> None:
        super().__init__()
        if n_prototypes < 1 or dim < 1:
            raise ValueError(f"method.n_prototypes and the projection dim must be >= 1, got "
                             f"{n_prototypes}, {dim}")
        self.layer = nn.Linear(dim, n_prototypes, bias=False)
        self.freeze_epochs = int(freeze_epochs)
        self.normalize_()

    @torch.no_grad()
    def normalize_(self) -> None:
        self.layer.weight.copy_(F.normalize(self.layer.weight, dim=1))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layer(z)

    def cancel_gradients(self, epoch: int) -> bool:
        """Drop the prototypes' gradients during the first ``freeze_epochs`` epochs."""
        return cancel_gradients(self, epoch, self.freeze_epochs)


class DINOHead(nn.Module):
    """DINO's projection head: MLP -> L2 normalisation -> weight-normalised last layer.

    The MLP is ``num_layers`` Linear layers with GELU between (BN after each hidden layer
    when ``use_bn``: off for ViTs, as the paper), ending in the ``bottleneck_dim`` (256)
    bottleneck; weights truncated-normal (std 0.02), biases zero. The last layer is
    ``Linear(bottleneck_dim, out_dim, bias=False)`` weight-normalised (``W = g v / ||v||``
    row-wise) with g filled with 1; ``norm_last_layer=True`` (the default) freezes g, so the
    rows stay unit vectors (``False``: g learns, better with care, less stable).
    ``freeze_last_layer`` epochs (1) are read by :meth:`cancel_last_layer_gradients`.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, num_layers: int = 3, *, use_bn: bool = False,
                 norm_last_layer: bool = True, freeze_last_layer: int = 1) -> None:
        super().__init__()
        for label, value in (("in_dim", in_dim), ("out_dim", out_dim),
                             ("hidden_dim", hidden_dim), ("bottleneck_dim", bottleneck_dim)):
            if int(value) < 1:
                raise ValueError(f"DINO head {label} must be >= 1, got {value}")
        if num_layers < 1:
            raise ValueError(f"DINO head num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        dim = int(in_dim)
        for _ in range(num_layers - 1):
            layers.append(nn.Linear(dim, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            dim = int(hidden_dim)
        layers.append(nn.Linear(dim, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        g = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            g.fill_(1.0)
        g.requires_grad_(not norm_last_layer)
        self.norm_last_layer = bool(norm_last_layer)
        self.freeze_last_layer = int(freeze_last_layer)

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised bottleneck (B, bottleneck_dim) that the last layer scores."""
        return F.normalize(self.mlp(x), dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.bottleneck(x))

    def cancel_last_layer_gradients(self, epoch: int) -> bool:
        """Drop the last layer's gradients during the first ``freeze_last_layer`` epochs."""
        return cancel_gradients(self.last_layer, epoch, self.freeze_last_layer)
