"""SwAV's swapped prediction with Sinkhorn-Knopp codes (Caron et al. 2020), exact under DDP.

- [0]: Unsupervised Learning of Visual Features by Contrasting Cluster Assignments, 2020,
  https://arxiv.org/abs/2006.09882
- [1]: https://github.com/facebookresearch/swav (``main_swav.py``: ``distributed_sinkhorn``)

The codes come from an equipartition over the *global* batch: the Sinkhorn sums are
all-reduced across ranks, so W ranks x B samples get the same codes as 1 rank x W*B. The
codes carry no gradient and the prediction terms are means over this rank's samples, so the
mean over ranks is the full-batch loss and DDP's gradient average is exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sslstream.models.objectives import gather as _gather
from sslstream.models.objectives._common import (
    LossParts,
    check_positive,
    full_precision,
    upcast,
)

__all__ = ["sinkhorn", "swav_loss"]


def _all_reduce(x: torch.Tensor, group: Any, gather: bool) -> torch.Tensor:
    if gather and _gather.get_world_size(group) > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, *,
             group: Any = None, gather: bool = True) -> torch.Tensor:
    """Soft codes Q (N, K) from prototype scores (N, K) by Sinkhorn-Knopp.

    As the official ``distributed_sinkhorn``: ``Q = exp(scores / eps)^T`` (K x N, N = all
    samples of all ranks) scaled to sum 1, then ``iterations`` times: rows (prototypes)
    scaled to sum 1/K, columns (samples) to 1/N; finally columns scaled to sum 1. The total
    and the row sums are all-reduced over ``group`` (``gather=True``), so every rank gets
    its rows of the codes of the global batch. Every rank must pass the same number of rows.

    Example:
        >>> codes = sinkhorn(torch.randn(16, 30).clamp(-1, 1))      # rows sum to 1
    """
    if scores.ndim != 2 or not scores.is_floating_point():
        raise ValueError(f"sinkhorn: scores must be a floating (N, K) tensor, got "
                         f"{tuple(scores.shape)} {scores.dtype}")
    check_positive("sinkhorn", "epsilon", epsilon)
    if iterations < 1:
        raise ValueError(f"sinkhorn: iterations must be >= 1, got {iterations}")
    (scores,) = upcast(scores.detach())
    with full_precision(scores.device):
        q = torch.exp(scores / epsilon).t()  # K x N
        n_prototypes = q.shape[0]
        n_samples = q.shape[1] * (_gather.get_world_size(group) if gather else 1)
        q = q / _all_reduce(q.sum(), group, gather)
        for _ in range(iterations):
            q = q / _all_reduce(q.sum(dim=1, keepdim=True), group, gather) / n_prototypes
            q = q / q.sum(dim=0, keepdim=True) / n_samples
        return (q * n_samples).t()


def _check_scores(scores: Sequence[torch.Tensor], n_global: int,
                  queue: Sequence[torch.Tensor] | None) -> None:
    if not 1 <= n_global <= len(scores) or len(scores) < 2:
        raise ValueError(
            f"swav_loss: needs >= 2 crops and 1 <= n_global <= crops, got {len(scores)} "
            f"crops and n_global={n_global}")
    first = scores[0]
    for i, s in enumerate(scores):
        if s.ndim != 2 or s.shape != first.shape or not s.is_floating_point():
            raise ValueError(
                f"swav_loss: crop {i} scores must be a floating (B, K) tensor shaped like "
                f"crop 0 {tuple(first.shape)}, got {tuple(s.shape)} {s.dtype}")
    if queue is not None:
        if len(queue) != n_global:
            raise ValueError(f"swav_loss: queue_scores needs one tensor per global crop "
                             f"({n_global}), got {len(queue)}")
        for i, s in enumerate(queue):
            if s.ndim != 2 or s.shape[1] != first.shape[1]:
                raise ValueError(f"swav_loss: queue_scores[{i}] must be (Q, {first.shape[1]}),"
                                 f" got {tuple(s.shape)}")


def swav_loss(
    scores: Sequence[torch.Tensor],
    *,
    n_global: int = 2,
    queue_scores: Sequence[torch.Tensor] | None = None,
    temperature: float = 0.1,
    epsilon: float = 0.05,
    iterations: int = 3,
    group: Any = None,
    gather: bool = True,
) -> LossParts:
    """Predict each global crop's code from every other crop (swapped prediction).

    With S_v = scores of crop v (the normalised projections times the normalised
    prototypes, (B, K)), the globals first, and q_g = sinkhorn([queue_g; S_g]) restricted to
    the batch rows::

        l(g, v) = -mean_i sum_k q_g[i, k] log softmax(S_v[i] / temperature)_k
        loss = mean_g ( sum_{v != g} l(g, v) / (V - 1) )

    over the ``n_global`` global crops g (the official ``crops_for_assign``) and all V crops
    v (official code and lightly's ``SwaVLoss``).

    Args:
        scores: V tensors (B, K), the ``n_global`` global crops first.
        n_global: how many leading crops give codes (2).
        queue_scores: per global crop, (Q, K) scores of this rank's share of the feature queue
            (:class:`~sslstream.models.state.FeatureQueue`) under the current prototypes:
            extra Sinkhorn columns for small batches; ``None`` without a queue.
        temperature: softmax temperature of the predictions (0.1).
        epsilon, iterations: Sinkhorn's (0.05, 3).
        group: process group whose Sinkhorn sums are all-reduced (default: the world).
        gather: all-reduce the Sinkhorn sums (``False``: codes from this rank's batch only).

    Returns:
        ``LossParts(loss, {})`` with the scalar loss.

    Example:
        >>> z = [F.normalize(torch.randn(8, 16), dim=1) for _ in range(4)]  # 2 global, 2 local
        >>> prototypes = F.normalize(torch.randn(30, 16), dim=1)
        >>> loss, _ = swav_loss([v @ prototypes.T for v in z])
    """
    _check_scores(scores, n_global, queue_scores)
    check_positive("swav_loss", "temperature", temperature)
    up = upcast(*scores)
    queue_up = upcast(*queue_scores) if queue_scores is not None else None
    with full_precision(up[0].device):
        log_preds = [F.log_softmax(s / temperature, dim=1) for s in up]
        batch = up[0].shape[0]
        loss = log_preds[0].new_zeros(())
        for g in range(n_global):
            out = up[g].detach()
            if queue_up is not None:
                out = torch.cat([queue_up[g].detach().to(out.dtype), out])
            codes = sinkhorn(out, epsilon, iterations, group=group, gather=gather)[-batch:]
            sub = log_preds[0].new_zeros(())
            for v, log_p in enumerate(log_preds):
                if v != g:
                    sub = sub - (codes * log_p).sum(dim=1).mean()
            loss = loss + sub / (len(up) - 1)
        return LossParts(loss / n_global, {})
