"""MoCo v3's symmetric InfoNCE with the keys of every rank (Chen, Xie & He 2021).

- [0]: An Empirical Study of Training Self-Supervised Vision Transformers, 2021,
  https://arxiv.org/abs/2104.02057
- [1]: https://github.com/facebookresearch/moco-v3 (``moco/builder.py``: ``contrastive_loss``)

No queue: the negatives of a query are the keys of the other images of the global batch,
gathered without gradient (keys come from the momentum encoder). The loss is a mean over
this rank's queries, so the mean over ranks is the full-batch loss and, the keys being
constants, DDP's gradient average is exact.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from sslstream.models.objectives import gather as _gather
from sslstream.models.objectives._common import (
    LossParts,
    check_pair,
    check_positive,
    full_precision,
    upcast,
)

__all__ = ["mocov3_loss"]


def _contrastive(q: torch.Tensor, k: torch.Tensor, temperature: float, group: Any,
                 gather: bool) -> torch.Tensor:
    """``ctr(q, k)``: cross-entropy of q_i against all gathered keys, key i the positive."""
    q = F.normalize(q, dim=1)
    k = F.normalize(k, dim=1)
    keys = _gather.gather_no_grad(k, group) if gather else k.detach()
    logits = q @ keys.T / temperature
    offset = _gather.get_rank(group) * q.shape[0] if gather else 0
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels) * (2.0 * temperature)


def mocov3_loss(
    q1: torch.Tensor,
    q2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
    temperature: float = 1.0,
    *,
    group: Any = None,
    gather: bool = True,
) -> LossParts:
    """``ctr(q1, k2) + ctr(q2, k1)``, each scaled by ``2 T`` as the official code.

    With u = x / ||x||, for N images in the global batch (keys of all ranks)::

        ctr(q, k) = 2T * mean_i -log( exp(u(q_i).u(k_i) / T) / sum_j exp(u(q_i).u(k_j) / T) )

    The ``2T`` factor is the official code's (it offsets the 1/T in the gradient of the
    logits); a collapsed model (all keys equal) scores ``2 * 2T log N``. Keys (momentum encoder
    outputs) are gathered from every rank without gradient; this rank's query i has the
    positive at index ``rank * B + i``.

    Args:
        q1, q2: (B, D) predictor outputs of the two views (the only inputs with gradient).
        k1, k2: (B, D) momentum-encoder projections of the same views (detached here).
        temperature: T > 0; the paper uses 0.2 for ViTs and 1.0 for ResNet-50 (the
            official default).
        group: process group to gather the keys over (default: the world).
        gather: use every rank's keys as negatives (``False``: this rank's keys only).

    Returns:
        ``LossParts(loss, {})`` with the scalar loss (fp32 when the inputs are fp16/bf16).

    Example:
        >>> q1, q2, k1, k2 = (torch.randn(8, 32) for _ in range(4))
        >>> loss, _ = mocov3_loss(q1, q2, k1, k2, temperature=0.2)
    """
    check_pair("mocov3_loss", q1, k2)
    check_pair("mocov3_loss", q2, k1)
    check_pair("mocov3_loss", q1, q2)
    check_positive("mocov3_loss", "temperature", temperature)
    q1, q2, k1, k2 = upcast(q1, q2, k1.detach(), k2.detach())
    with full_precision(q1.device):
        loss = (_contrastive(q1, k2.to(q1.dtype), temperature, group, gather)
                + _contrastive(q2, k1.to(q2.dtype), temperature, group, gather))
    return LossParts(loss, {})
