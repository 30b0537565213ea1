"""SimSiam's negative cosine similarity (Chen & He 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sslstream.models.objectives._common import LossParts, check_pair, full_precision, upcast

__all__ = ["simsiam_loss"]


def simsiam_loss(p: torch.Tensor, z: torch.Tensor, *,
                 stop_gradient: bool = True) -> LossParts:
    """D(p, stopgrad(z)) = - mean_i cos(p_i, z_i).

    The stop-gradient on ``z`` is what keeps SimSiam from collapsing; ``stop_gradient=False``
    lets gradient flow into ``z`` too, for reproducing the paper's collapse experiment (Fig. 2).
    One direction only; the caller symmetrises, e.g.
    ``0.5 * (simsiam_loss(p1, z2).loss + simsiam_loss(p2, z1).loss)`` (the paper, range [-1, 1]).
    Local per rank (nothing gathered).

    Args:
        p: (N, D) predictor outputs.
        z: (N, D) projections of the other view.
        stop_gradient: detach ``z``.

    Returns:
        ``LossParts(loss, {})``: the scalar loss in [-1, 1]; -1 when p and z point the same
        way.
    """
    check_pair("simsiam_loss", p, z)
    if stop_gradient:
        z = z.detach()
    p, z = upcast(p, z)
    with full_precision(p.device):
        return LossParts(-F.cosine_similarity(p, z.to(p.dtype), dim=1).mean(), {})
