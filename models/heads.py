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
========================  ==================================================================
"""

from __future__ import annotations

from torch import nn

__all__ = [
    "barlow_projector",
    "byol_mlp",
    "mlp",
    "moco_projector",
    "simclr_projector",
    "simsiam_predictor",
    "simsiam_projector",
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
