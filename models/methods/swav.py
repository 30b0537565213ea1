"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn cluster codes over multi-crop views.

online:     backbone -> projector (:func:`~sslstream.models.heads.swav_projector`, Linear-BN-
            ReLU-Linear) over every crop (one backbone call per crop size,
            :func:`forward_by_size`), L2-normalised, scored against
            :class:`~sslstream.models.heads.SwAVPrototypes` (``n_prototypes`` unit vectors,
            renormalised after every optimizer step)
codes:      Sinkhorn-Knopp over the scores of each global crop (``epsilon``, ``iterations``),
            its sums all-reduced across ranks (exact under DDP); with a feature queue, the
            queue's scores under the current prototypes are extra Sinkhorn columns
loss:       swav_loss: every crop predicts every other global crop's codes (softmax at
            ``temperature``)
queue:      one :class:`~sslstream.models.state.FeatureQueue` of ``queue_size`` past
            projections per global crop, filled from epoch ``queue_start_epoch`` on and used
            once full (small batches: more samples for the equipartition); ``queue_size: 0``
            for none

The prototypes' gradients are dropped during the first ``freeze_prototypes_epochs`` epochs
(:meth:`SwAV.after_backward`). Sources: the paper (arXiv 2006.09882) and
facebookresearch/swav ``main_swav.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from sslstream.conf.typed import Ge
from sslstream.models.heads import SwAVPrototypes, swav_projector
from sslstream.models.methods.base import (
    Method,
    MethodConfig,
    MethodConfigError,
    Metrics,
    Positive,
    Width,
)
from sslstream.models.methods.multicrop import forward_by_size
from sslstream.models.objectives import get_world_size, swav_loss
from sslstream.models.state import FeatureQueue
from torch import nn

Count = Annotated[int, Ge(0)]
N_GLOBAL = 2  # the crops that give codes (the official crops_for_assign = [0, 1])


@dataclass(frozen=True, kw_only=True)
class SwAVConfig(MethodConfig):
    """Head, prototypes, Sinkhorn, queue (values: conf/recipe/swav_*.yaml)."""

    name = "swav"
    proj_hidden_dim: Width           # 2048
    proj_output_dim: Width           # 128: the space of the prototypes
    n_prototypes: Width              # 3000
    temperature: Positive = 0.1      # of the predictions' softmax
    epsilon: Positive = 0.05         # Sinkhorn's entropic regularisation
    sinkhorn_iterations: Width = 3
    queue_size: Count = 0            # past projections per global crop (0: no queue)
    queue_start_epoch: Count = 15    # the epoch from which the queue is filled
    freeze_prototypes_epochs: Count = 1  # epochs whose prototype gradients are dropped
    gather: bool = True              # all-reduce the Sinkhorn sums (codes of the global batch)
    sync_bn: bool = True             # cross-replica BN under multi-GPU DDP (CUDA only)


class SwAV(Method):
    config_class = SwAVConfig
    config: SwAVConfig
    multi_crop = True

    def __init__(self, backbone: nn.Module, config: SwAVConfig, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = swav_projector(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim)
        self.prototypes = SwAVPrototypes(c.proj_output_dim, c.n_prototypes,
                                         freeze_epochs=c.freeze_prototypes_epochs)
        world = get_world_size(process_group)
        if c.queue_size % world:
            raise MethodConfigError(
                f"method.queue_size={c.queue_size} must be a multiple of the number of ranks "
                f"({world}): each rank scores its own block of the queue", "method.queue_size")
        self.queues = nn.ModuleList(
            FeatureQueue(c.queue_size, c.proj_output_dim, process_group=process_group)
            for _ in range(N_GLOBAL if c.queue_size else 0))

    @property
    def ddp_static_buffers(self) -> list[str]:
        """The queues: identical on every rank by construction (each enqueue gathers)."""
        return [f"queues.{i}.{b}" for i in range(len(self.queues))
                for b in ("keys", "ptr", "filled")]

    def _queue_scores(self) -> list[torch.Tensor] | None:
        """Each global crop's queue (this rank's block of rows) scored by the current
        prototypes, once the queues are full; None before (or without a queue)."""
        if not self.queues or not all(q.full for q in self.queues):
            return None
        with torch.no_grad():
            return [self.prototypes(q.rank_rows()) for q in self.queues]

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        c = self.config
        n = views[0].shape[0]
        z = F.normalize(self.projector(forward_by_size(self.backbone, views)), dim=1)
        scores = self.prototypes(z).split(n)
        loss, _ = swav_loss(scores, n_global=N_GLOBAL, queue_scores=self._queue_scores(),
                            temperature=c.temperature, epsilon=c.epsilon,
                            iterations=c.sinkhorn_iterations, group=self.process_group,
                            gather=c.gather)
        if self.queues and self.epoch >= c.queue_start_epoch:
            for g, queue in enumerate(self.queues):  # after the loss used the old contents
                queue.enqueue(z[g * n:(g + 1) * n].detach())
        return loss, {"loss": loss.detach(), "embeddings": z[:n].detach()}

    def after_backward(self, epoch: int) -> None:
        """Drop the prototypes' gradients during the first ``freeze_prototypes_epochs``."""
        self.prototypes.cancel_gradients(epoch)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Project the prototypes back onto the unit sphere (they moved in the step)."""
        super().after_optimizer_step(step, total_steps)
        self.prototypes.normalize_()
