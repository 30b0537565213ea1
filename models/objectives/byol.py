"""BYOL's regression loss (Grill et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sslstream.models.objectives._common import LossParts, check_pair, full_precision, upcast

__all__ = ["byol_loss"]


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> LossParts:
    """Mean squared error between L2-normalised prediction and target::

        loss = mean_i || p_i/||p_i|| - z_i/||z_i|| ||^2 = mean_i (2 - 2 cos(p_i, z_i))

    ``z`` (the target network's projection) is detached here: BYOL never back-propagates into
    the target. One direction only; the caller symmetrises, e.g.
    ``byol_loss(p1, z2).loss + byol_loss(p2, z1).loss`` (the paper's sum, range [0, 8]) or its half.
    Local per rank (nothing gathered): the mean over ranks is the full-batch loss.

    Args:
        p: (N, D) online predictions.
        z: (N, D) target projections of the other view.

    Returns:
        ``LossParts(loss, {})``: the scalar loss in [0, 4]; 0 when p and z point the same way.
    """
    check_pair("byol_loss", p, z)
    p, z = upcast(p, z.detach())
    with full_precision(p.device):
        cos = F.cosine_similarity(p, z.to(p.dtype), dim=1)
        return LossParts((2.0 - 2.0 * cos).mean(), {})
