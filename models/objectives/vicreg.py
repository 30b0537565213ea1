"""VICReg (Bardes, Ponce & LeCun 2022), as the official facebookresearch/vicreg code."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sslstream.models.objectives._common import (
    LossParts,
    check_pair,
    check_positive,
    full_precision,
    global_batch,
    off_diagonal,
    upcast,
)

__all__ = ["vicreg_loss"]


def vicreg_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    eps: float = 1e-4,
    *,
    group: Any = None,
    gather: bool = True,
) -> LossParts:
    """Variance-Invariance-Covariance regularisation.

    With x, y the (B, D) embeddings of this rank and X, Y the gathered global batch
    (N = world_size * B rows), centred per dimension (Xc = X - mean_n X)::

        invariance = mean_{i,d} (x_id - y_id)^2                      (local, F.mse_loss)
        std_X      = sqrt(var_n(X) + eps)         (unbiased var, per dimension)
        variance   = mean_d relu(1 - std_X)/2 + mean_d relu(1 - std_Y)/2
        cov_X      = Xc^T Xc / (N - 1)
        covariance = sum_{d != e} cov_X[d,e]^2 / D + sum_{d != e} cov_Y[d,e]^2 / D
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance

    This is the official code's normalisation (variance halved per branch; solo-learn's
    variance term is twice this, so its std_coeff is not comparable). The invariance term is
    local, so the mean over ranks of the per-rank losses is the full-batch loss; variance and
    covariance are identical on every rank and computed on the gathered batch with gradient,
    so DDP-averaged gradients equal one process on the whole batch.

    Args:
        z1, z2: (B, D) expander outputs of the two views; row i of both from the same image.
        sim_coeff, std_coeff, cov_coeff: the paper's lambda, mu, nu (25, 25, 1).
        eps: added to the variance inside the square root (official 1e-4).
        group: process group to gather over (default: the world).
        gather: compute variance/covariance on the global batch (``False``: this rank only).

    Returns:
        ``LossParts(loss, parts)``: the scalar loss and its unweighted terms
        ``{"invariance", "variance", "covariance"}``, detached, for logging.
    """
    check_pair("vicreg_loss", z1, z2)
    check_positive("vicreg_loss", "eps", eps)
    z1, z2 = upcast(z1, z2)
    with full_precision(z1.device):
        invariance = F.mse_loss(z1, z2)
        x, y = global_batch(z1, group, gather), global_batch(z2, group, gather)
        n, dim = x.shape
        if n < 2:
            raise ValueError(f"vicreg_loss: needs at least 2 samples in the global batch, got {n}")
        x = x - x.mean(dim=0)
        y = y - y.mean(dim=0)
        std_x = torch.sqrt(x.var(dim=0) + eps)
        std_y = torch.sqrt(y.var(dim=0) + eps)
        variance = F.relu(1 - std_x).mean() / 2 + F.relu(1 - std_y).mean() / 2
        cov_x = x.T @ x / (n - 1)
        cov_y = y.T @ y / (n - 1)
        covariance = off_diagonal(cov_x).pow(2).sum() / dim + off_diagonal(cov_y).pow(2).sum() / dim
        loss = sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance
    parts = {
        "invariance": invariance.detach(),
        "variance": variance.detach(),
        "covariance": covariance.detach(),
    }
    return LossParts(loss, parts)
