"""Cross-rank gathers for the objectives, with and without gradient.

Why a custom autograd function: ``torch.distributed.all_gather`` is not differentiable, so a
loss built on its output sends no gradient to the other ranks' samples. With DDP averaging
parameter gradients over ranks, that silently changes the objective (measured on 2 gloo
ranks: SimCLR off by 0.27, VICReg by 1.56; lightly and vissl shipped the bug;
tests/models/test_objectives_ddp.py shows it). :class:`_GatherLayer`
all-gathers in forward and, in backward, all-reduces (SUM) the incoming gradients of the whole
gathered tensor and keeps this rank's slice: the slice then holds the gradient of *every*
rank's loss w.r.t. this rank's samples, which is what DDP's average needs (docs/objectives.md).

All functions work without an initialised process group (single process): they then return
the input, rank 0 and world size 1, so the objectives run unchanged in tests and notebooks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["gather_no_grad", "gather_with_grad", "get_rank", "get_world_size", "is_distributed"]


def is_distributed() -> bool:
    """True when torch.distributed is available and a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def get_rank(group: Any = None) -> int:
    """This process's rank in ``group`` (0 when torch.distributed is not initialised)."""
    return dist.get_rank(group) if is_distributed() else 0


def get_world_size(group: Any = None) -> int:
    """Number of processes in ``group`` (1 when torch.distributed is not initialised)."""
    return dist.get_world_size(group) if is_distributed() else 1


class _GatherLayer(torch.autograd.Function):
    """all_gather in forward; all_reduce(SUM) of the gradients and own slice in backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        x = x.contiguous()
        out = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(out, x, group=group)
        return tuple(out)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        stacked = torch.stack([g.contiguous() for g in grads])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM, group=ctx.group)
        return stacked[ctx.rank], None


def gather_with_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0, differentiably (rank order).

    Every rank must pass a tensor of the same shape (equal per-rank batches, which the loader
    guarantees with drop_last); all ranks of ``group`` must call it, in the same order.
    Returns ``x`` itself when not distributed or the group has one process.
    """
    if get_world_size(group) == 1:
        return x
    return torch.cat(_GatherLayer.apply(x, group), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor, group: Any = None) -> torch.Tensor:
    """Concatenate ``x`` of every rank along dim 0 as a constant (e.g. MoCo's queue keys).

    Same shape rule as :func:`gather_with_grad`; the result never carries gradient.
    """
    x = x.detach()
    world_size = get_world_size(group)
    if world_size == 1:
        return x
    x = x.contiguous()
    out = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(out, x, group=group)
    return torch.cat(out, dim=0)
