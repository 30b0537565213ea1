"""The margin contrastive loss of Hadsell, Chopra & LeCun (2006), exact under DDP."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sslstream.models.objectives._common import (
    LossParts,
    anchors_and_candidates,
    check_pair,
    check_positive,
    full_precision,
    upcast,
)

__all__ = ["contrastive_margin"]


def contrastive_margin(
    z1: torch.Tensor,
    z2: torch.Tensor,
    margin: float = 1.0,
    *,
    normalize: bool = True,
    group: Any = None,
    gather: bool = True,
) -> LossParts:
    """Pull the two views of an image together, push other images beyond ``margin``.

    Hadsell et al. score a pair at Euclidean distance d with ``1/2 d^2`` when similar and
    ``1/2 max(0, m - d)^2`` when dissimilar. Here the similar pairs are the N positive pairs
    (z1_i, z2_i) and the dissimilar pairs are all pairs of embeddings of *different* images in
    the global batch of N images (2N embeddings: 2N(N - 1) unordered pairs, both views, within
    and across views). Each kind is averaged separately so neither dominates by count::

        loss = 1/2 mean_i d(z1_i, z2_i)^2 + 1/2 mean_{a, b from different images} max(0, m - d_ab)^2

    With ``normalize=True`` (default) the embeddings are L2-normalised first, so d is in
    [0, 2] and a margin near 1 is meaningful; with ``normalize=False`` raw distances are used
    (the margin must then match the embedding scale). Pairs at exactly zero distance get a
    zero gradient from the margin term (the push direction is undefined there).

    Distributed (``gather=True``): local anchors (this rank's 2B embeddings) against the
    gathered candidates, like :func:`nt_xent`; the negative mean runs over ordered
    (anchor, candidate) pairs, which equals the mean over unordered pairs, and the mean of the
    per-rank losses equals the full-batch loss (same for DDP-averaged gradients).

    Args:
        z1, z2: (B, D) embeddings of the two views; row i of both comes from the same image.
        margin: m > 0.
        normalize: L2-normalise the embeddings before measuring distances.
        group: process group to gather over (default: the world).
        gather: gather candidates across ranks (``False``: negatives from this rank only).

    Returns:
        ``LossParts(loss, {})`` with the scalar loss. The negative term is 0 when the global
        batch has a single image.
    """
    check_pair("contrastive_margin", z1, z2)
    check_positive("contrastive_margin", "margin", margin)
    z1, z2 = upcast(z1, z2)
    with full_precision(z1.device):
        if normalize:
            z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        positive = 0.5 * (z1 - z2).pow(2).sum(dim=1).mean()

        anchors, candidates, self_idx, pos_idx = anchors_and_candidates(z1, z2, group, gather)
        dot = anchors @ candidates.T
        if normalize:
            d2 = 2.0 - 2.0 * dot
        else:
            d2 = anchors.pow(2).sum(1, keepdim=True) + candidates.pow(2).sum(1) - 2.0 * dot
        d2 = d2.clamp_min(0.0)  # rounding can make the expansion slightly negative
        # sqrt has an infinite derivative at 0: take it only where d2 > 0 (double-where trick).
        positive_d2 = d2 > 0
        d = torch.where(positive_d2, d2.where(positive_d2, 1.0).sqrt(), 0.0)

        negatives_per_anchor = candidates.shape[0] - 2
        if negatives_per_anchor == 0:
            return LossParts(positive, {})
        negative_mask = torch.ones_like(d2)
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        negative_mask[rows, self_idx] = 0.0
        negative_mask[rows, pos_idx] = 0.0
        push = (F.relu(margin - d).pow(2) * negative_mask).sum()
        negative = 0.5 * push / (anchors.shape[0] * negatives_per_anchor)
        return LossParts(positive + negative, {})
