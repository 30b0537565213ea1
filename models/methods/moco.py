"""MoCo v2 (Chen et al. 2020): queries against a momentum encoder's keys and a key queue.

query encoder: backbone -> projector (Linear-ReLU-Linear, no BN: moco/builder.py)
key encoder:   EMA copy (:class:`~sslstream.models.state.MomentumEncoder`; MoCo's m = 0.999 is
               ``tau_base = tau_final = 0.999``), updated after each optimizer step
queue:         :class:`~sslstream.models.state.Queue`, the view-2 keys of all ranks, enqueued after
               the loss
loss:          info_nce(q1, k2, queue)

``symmetric: true`` is solo-learn's MoCo v2+: a second queue ``queue_view1`` holds the view-1
keys, and the loss is (info_nce(q1, k2, queue) + info_nce(q2, k1, queue_view1)) / 2 -- each
query is contrasted with past keys of the *other* view, and each queue keeps ``queue_size``
keys (solo-learn's ``queue`` of shape (2, D, K)). Both queues are buffers (checkpointed).

``bn`` keeps the key encoder's BatchNorm from leaking which sample is the positive:
``shuffle`` (the paper) shuffles the batch across ranks before the key encoder and restores
the order after it, so each rank's key-BN statistics come from other images than its query-BN
statistics (on one process it is a no-op); ``sync`` asks the trainer for SyncBatchNorm
(CUDA only); ``none`` does nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sslstream.models.heads import moco_projector
from sslstream.models.methods.base import (
    Method,
    MethodConfig,
    Metrics,
    Momentum,
    MomentumPair,
    Positive,
    Width,
)
from sslstream.models.objectives import gather_no_grad, get_rank, get_world_size, info_nce
from sslstream.models.state import MomentumEncoder, Queue
from torch import nn


@dataclass(frozen=True, kw_only=True)
class MoCoV2Config(MethodConfig):
    """Heads, temperature, queue, key-encoder momentum, BN mode (values: conf/recipe/mocov2_*.yaml)."""

    name = "mocov2"
    proj_hidden_dim: Width
    proj_output_dim: Width
    temperature: Positive
    queue_size: Width                # keys per queue (>= the global batch)
    tau_base: Momentum
    tau_final: Momentum | None = None  # None: tau_base (MoCo's constant m)
    bn: Literal["shuffle", "sync", "none"] = "shuffle"
    symmetric: bool = False          # MoCo v2+: both directions, one queue per view

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tau_final is None:
            object.__setattr__(self, "tau_final", self.tau_base)


class MoCoV2(Method):
    config_class = MoCoV2Config

    def __init__(self, backbone: nn.Module, config: MoCoV2Config, *,
                 process_group: Any = None) -> None:
        c = config
        super().__init__(backbone, c, process_group=process_group)
        self.projector = moco_projector(self.feature_dim, c.proj_hidden_dim, c.proj_output_dim)
        self.momentum = MomentumEncoder(nn.Sequential(self.backbone, self.projector),
                                        tau_base=c.tau_base, tau_final=c.tau_final)
        self.queue = Queue(c.queue_size, c.proj_output_dim, process_group=process_group)
        # symmetric only: the view-1 keys (negatives for q2); another seed, another init
        self.queue_view1 = (Queue(c.queue_size, c.proj_output_dim, process_group=process_group,
                                  seed=1) if c.symmetric else None)
        self.temperature = c.temperature
        self.bn = c.bn
        self.symmetric = c.symmetric

    @property
    def wants_sync_bn(self) -> bool:
        return self.bn == "sync"

    @property
    def momentum_pairs(self) -> list[MomentumPair]:
        return [MomentumPair((self.backbone, self.projector), self.momentum)]

    # -- shuffle-BN (moco/builder.py's _batch_shuffle_ddp / _batch_unshuffle_ddp) -------------

    def _shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a random permutation of the global batch, and the inverse."""
        group = self.process_group
        x_all = gather_no_grad(x, group)
        perm = torch.randperm(x_all.shape[0], device=x.device)
        src = 0 if group is None else dist.get_global_rank(group, 0)
        dist.broadcast(perm, src=src, group=group)  # every rank uses rank 0's permutation
        b, r = x.shape[0], get_rank(group)
        return x_all[perm[r * b:(r + 1) * b]], torch.argsort(perm)

    def _unshuffle(self, k: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        k_all = gather_no_grad(k, self.process_group)
        b, r = k.shape[0], get_rank(self.process_group)
        return k_all[inverse[r * b:(r + 1) * b]]

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """L2-normalised key-encoder outputs for ``x``, in ``x``'s order."""
        if self.bn == "shuffle" and get_world_size(self.process_group) > 1:
            shuffled, inverse = self._shuffle(x)
            k = self._unshuffle(self.momentum(shuffled), inverse)
        else:
            k = self.momentum(x)
        return F.normalize(k, dim=1)

    # -- step ---------------------------------------------------------------------------------

    def training_step(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Metrics]:
        view1, view2 = views[0], views[1]
        z1 = self.projector(self.backbone(view1))
        q1 = F.normalize(z1, dim=1)
        k2 = self.keys(view2)
        # A copy: the enqueue below writes in place into the buffer autograd would save.
        loss, _ = info_nce(q1, k2, self.queue.keys.clone(), self.temperature)
        if self.queue_view1 is not None:
            q2 = F.normalize(self.projector(self.backbone(view2)), dim=1)
            k1 = self.keys(view1)
            loss = 0.5 * (loss + info_nce(q2, k1, self.queue_view1.keys.clone(),
                                          self.temperature).loss)
            self.queue_view1.enqueue(k1)
        self.queue.enqueue(k2)
        metrics = {"loss": loss.detach(), "tau": self.momentum.last_tau.clone(),
                   "embeddings": z1.detach()}
        return loss, metrics

    @property
    def ddp_static_buffers(self) -> list[str]:
        """Buffers that are identical on every rank by construction (the queue): DDP's
        per-step ``broadcast_buffers`` need not copy them (65536 x 128 floats = 32 MB)."""
        names = ["queue.keys", "queue.ptr"]
        if self.queue_view1 is not None:
            names += ["queue_view1.keys", "queue_view1.ptr"]
        return names
