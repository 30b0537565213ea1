"""Barlow Twins (Zbontar et al. 2021), exact under DDP."""

from __future__ import annotations

from typing import Any

import torch
from sslstream.models.objectives._common import (
    LossParts,
    check_pair,
    check_positive,
    full_precision,
    global_batch,
    off_diagonal,
    upcast,
)

__all__ = ["barlow_twins_loss"]


def _standardise(x: torch.Tensor, eps: float) -> torch.Tensor:
    """BatchNorm1d(affine=False) in training mode: biased variance, eps inside the sqrt."""
    mean = x.mean(dim=0)
    var = x.var(dim=0, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def barlow_twins_loss(
    z1: torch.Tensor,
    z2: torch.Tensor,
    lambd: float = 0.0051,
    *,
    eps: float = 1e-5,
    group: Any = None,
    gather: bool = True,
) -> LossParts:
    """Drive the cross-correlation of the two views' embeddings to the identity.

    With A, B the gathered global batch (N rows, D dims) standardised per dimension with the
    GLOBAL batch mean and biased variance (``BatchNorm1d(affine=False)`` with SyncBN, as the
    paper; eps inside the square root)::

        C = A^T B / N                                   (D x D; C_ij in [-1, 1] up to eps)
        on_diag  = sum_i (1 - C_ii)^2
        off_diag = sum_{i != j} C_ij^2
        loss = on_diag + lambd * off_diag

    Scale: like the official code (``c.div_(batch_size)``, sums not means) the loss grows with
    D: on_diag is at most ~4D and lambd = 0.0051 was tuned for D = 8192. The official code
    all-reduces C without gradient, which leaves every rank's gradient 1/world_size too
    small after DDP's average; here the embeddings are gathered with gradient and every rank
    computes the same global loss, so DDP's averaged gradients equal one process on the
    whole batch.

    Args:
        z1, z2: (B, D) projector outputs of the two views; row i of both from the same image.
        lambd: weight of the redundancy-reduction (off-diagonal) term.
        eps: BatchNorm's epsilon (1e-5).
        group: process group to gather over (default: the world).
        gather: standardise and correlate over the global batch (``False``: this rank only).

    Returns:
        ``LossParts(loss, parts)``: the scalar loss and the unweighted sums
        ``{"on_diag", "off_diag"}``, detached, for logging.
    """
    check_pair("barlow_twins_loss", z1, z2)
    check_positive("barlow_twins_loss", "eps", eps)
    z1, z2 = upcast(z1, z2)
    with full_precision(z1.device):
        a, b = global_batch(z1, group, gather), global_batch(z2, group, gather)
        n = a.shape[0]
        if n < 2:
            raise ValueError(
                f"barlow_twins_loss: needs at least 2 samples in the global batch, got {n}"
            )
        c = _standardise(a, eps).T @ _standardise(b, eps) / n
        on_diag = (1 - torch.diagonal(c)).pow(2).sum()
        off_diag = off_diagonal(c).pow(2).sum()
        loss = on_diag + lambd * off_diag
    return LossParts(loss, {"on_diag": on_diag.detach(), "off_diag": off_diag.detach()})
