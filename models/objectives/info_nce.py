"""MoCo's InfoNCE loss against a queue of negative keys (He et al. 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from sslstream.models.objectives._common import (
    LossParts,
    check_pair,
    check_positive,
    full_precision,
    upcast,
)

__all__ = ["info_nce"]


def info_nce(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    temperature: float = 0.2,
) -> LossParts:
    """Cross-entropy of each query against its key (positive) and the queue (negatives).

    With q, k and the queue rows L2-normalised::

        logits_i = [q_i . k_i, q_i . queue_1, ..., q_i . queue_K] / T
        loss = mean_i -log softmax(logits_i)[0]

    ``k`` and ``queue`` are constants (detached here): in MoCo they come from the momentum
    encoder and receive no gradient. Nothing is gathered: the loss is local per rank and the
    mean over ranks is the full-batch loss. Keeping the queue (gathering keys with
    :func:`sslstream.models.objectives.gather.gather_no_grad` before enqueueing) is the method's job.

    Args:
        q: (N, D) queries (online encoder), the only input that gets gradient.
        k: (N, D) keys of the same images (momentum encoder).
        queue: (K, D) negative keys, one per ROW (note: the official code stores (D, K));
            rows are re-normalised here (idempotent for normalised keys; zero rows give
            logit 0). K = 0 is allowed (loss 0 in the limit of only the positive).
        temperature: T > 0; MoCo v1 0.07, v2 0.2.

    Returns:
        ``LossParts(loss, {})`` with the scalar loss.
    """
    check_pair("info_nce", q, k)
    check_positive("info_nce", "temperature", temperature)
    if queue.ndim != 2 or queue.shape[1] != q.shape[1]:
        raise ValueError(
            f"info_nce: queue must be (K, {q.shape[1]}) with one key per row, got {tuple(queue.shape)}"
        )
    q, k, queue = upcast(q, k.detach(), queue.detach())
    with full_precision(q.device):
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1).to(q.dtype)
        queue = F.normalize(queue, dim=1).to(q.dtype)
        positive = (q * k).sum(dim=1, keepdim=True)
        negative = q @ queue.T
        logits = torch.cat([positive, negative], dim=1) / temperature
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return LossParts(F.cross_entropy(logits, labels), {})
