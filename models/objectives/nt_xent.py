"""SimCLR's NT-Xent loss (Chen et al. 2020), exact under DDP."""

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

__all__ = ["nt_xent"]


def nt_xent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.5,
    *,
    group: Any = None,
    gather: bool = True,
) -> LossParts:
    """Normalised-temperature cross-entropy over the two views of a batch.

    With u = z / ||z|| and sim(a, b) = u_a . u_b, each anchor a (every view of every sample)
    has one positive p(a) (the other view of its image) and 2N - 2 negatives (all other
    embeddings of the global batch of N images, 2N embeddings)::

        l(a) = -log( exp(sim(a, p(a)) / T) / sum_{b != a} exp(sim(a, b) / T) )
        loss = mean over anchors of l(a)

    Distributed (``gather=True``, world size W): the anchors are this rank's 2B embeddings,
    the candidates the 2N = 2WB gathered embeddings (with gradient), as in the official
    SimCLR; the mean over ranks of the per-rank losses is then the full-batch loss and DDP's
    gradient average matches one process on the whole batch. ``gather=False`` uses only this
    rank's batch as negatives (2B - 2 per anchor).

    Args:
        z1, z2: (B, D) projections of the two views; row i of both comes from the same image.
        temperature: T > 0; SimCLR uses 0.5 for CIFAR-scale batches, 0.1 for large ones.
        group: process group to gather over (default: the world).
        gather: gather candidates across ranks.

    Returns:
        ``LossParts(loss, {})`` with the scalar loss (fp32 when the inputs are fp16/bf16).
    """
    check_pair("nt_xent", z1, z2)
    check_positive("nt_xent", "temperature", temperature)
    z1, z2 = upcast(z1, z2)
    with full_precision(z1.device):
        z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
        anchors, candidates, self_idx, pos_idx = anchors_and_candidates(z1, z2, group, gather)
        logits = anchors @ candidates.T / temperature
        rows = torch.arange(anchors.shape[0], device=anchors.device)
        logits[rows, self_idx] = float("-inf")
        return LossParts(F.cross_entropy(logits, pos_idx), {})
