"""The state a method carries between steps: a momentum (EMA) target, a MoCo key queue,
SwAV's feature queue and DINO's teacher center.

All are ``nn.Module`` s whose state lives in parameters and buffers only, so a method's
``state_dict()`` captures it and ``load_state_dict()`` restores it bit-exactly -- including the
EMA step counter that drives BYOL's tau schedule (solo-learn does not checkpoint it, so a
resumed run restarts the schedule), the queue pointers and fill counts (lightly checkpoints
neither) and the center.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from sslstream.models.objectives.gather import gather_no_grad, get_rank, get_world_size
from torch import nn

__all__ = ["DINOCenter", "FeatureQueue", "MomentumEncoder", "Queue", "cosine_tau"]


def cosine_tau(step: int, total_steps: int, tau_base: float, tau_final: float = 1.0) -> float:
    """BYOL's EMA rate: ``tau_final - (tau_final - tau_base) * (cos(pi k / K) + 1) / 2``.

    With ``tau_final = 1`` this is the paper's ``1 - (1 - tau_base)(cos(pi k/K) + 1)/2``: tau
    starts at ``tau_base`` and reaches 1 at the last step. ``tau_final = tau_base`` gives a
    constant rate (MoCo's m = 0.999). Steps past ``total_steps`` hold ``tau_final``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be > 0 for the tau schedule, got {total_steps}")
    k = min(max(int(step), 0), int(total_steps))
    return tau_final - (tau_final - tau_base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


class MomentumEncoder(nn.Module):
    """An EMA copy of an online network: ``target <- tau * target + (1 - tau) * online``.

    The target is a deep copy of the online network at construction (same initialisation,
    as in BYOL and MoCo), never receives gradients and runs in whatever train/eval mode its
    owner is in (BYOL keeps the target in train mode: its BN uses batch statistics and keeps
    its own running statistics; only parameters are averaged, as in BYOL, MoCo and solo-learn).

    :meth:`update` must be called once per *real* optimizer step (not per forward, not for a
    step the AMP grad scaler skipped): the buffer ``step`` counts the updates done, is the ``k``
    of the cosine schedule and is saved in ``state_dict``. ``tau_base = 1`` never changes the
    target: BYOL's motivating experiment (a frozen random target, 18.8% linear accuracy
    instead of 1.4% for the raw random network).
    """

    step: torch.Tensor
    last_tau: torch.Tensor

    def __init__(self, online: nn.Module, tau_base: float = 0.99, tau_final: float = 1.0) -> None:
        super().__init__()
        for label, value in (("tau_base", tau_base), ("tau_final", tau_final)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"method.{label} must be in [0, 1], got {value}")
        self.tau_base = float(tau_base)
        self.tau_final = float(tau_final)
        self.target = copy.deepcopy(online)
        self.target.requires_grad_(False)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # The rate of the last update (tau_base before any), for the ``tau`` metric; a buffer
        # so that a resumed run reports the right value from its first step.
        self.register_buffer("last_tau", torch.tensor(self.tau_base, dtype=torch.float32))
        # Host-side mirrors: reading the buffers each step would be a device sync.
        self._step = 0
        self._last_tau = self.tau_base
        self.register_load_state_dict_post_hook(MomentumEncoder._sync_host_mirrors)

    @staticmethod
    def _sync_host_mirrors(module: nn.Module, _incompatible: object) -> None:
        module._step = int(module.step)
        # float32 in the buffer (MPS has no float64); the schedule recomputes it exactly
        module._last_tau = float(module.last_tau)

    @property
    def last_tau_value(self) -> float:
        """The tau of the last :meth:`update` (``tau_base`` before the first), host-side."""
        return self._last_tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.target(x)

    def tau(self, total_steps: int) -> float:
        """The rate the next :meth:`update` will use."""
        return cosine_tau(self._step, total_steps, self.tau_base, self.tau_final)

    @torch.no_grad()
    def update(self, online: nn.Module | Iterable[nn.Parameter], total_steps: int) -> float:
        """Move the target towards ``online`` (same architecture) and advance ``step``.

        Returns the tau used. ``online`` may be the module or its parameters in the order of
        ``target.parameters()``.
        """
        tau = self.tau(total_steps)
        if tau < 1.0:  # tau == 1: frozen target; skip even the (exact) no-op lerp
            src = list(online.parameters() if isinstance(online, nn.Module) else online)
            dst = list(self.target.parameters())
            if len(src) != len(dst):
                raise ValueError(
                    f"MomentumEncoder.update: online network has {len(src)} parameter tensors, "
                    f"the target {len(dst)}; they must be the same architecture"
                )
            torch._foreach_lerp_(dst, [p.detach() for p in src], 1.0 - tau)
        self.step.add_(1)
        self.last_tau.fill_(tau)
        self._step += 1
        self._last_tau = tau
        return tau

    def extra_repr(self) -> str:
        return f"tau_base={self.tau_base}, tau_final={self.tau_final}"


class Queue(nn.Module):
    """MoCo's dictionary: a ring buffer of the last ``size`` keys (without gradient).

    :meth:`enqueue` takes this rank's keys, gathers the keys of ALL ranks (global rank order,
    rank 0's first) and writes them at the pointer, wrapping around the end. Every rank so
    holds the same queue. Contents and pointer are buffers, so ``state_dict`` restores them.
    The initial contents are random unit vectors, as in MoCo.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(self, size: int, dim: int, *, process_group: dist.ProcessGroup | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"method.queue_size and the key dim must be >= 1, got {size}, {dim}")
        self.size = int(size)
        self.process_group = process_group
        # Seeded so every rank starts from the same queue without a broadcast.
        gen = torch.Generator().manual_seed(seed)
        init = nn.functional.normalize(torch.randn(size, dim, generator=gen), dim=1)
        self.register_buffer("keys", init)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.int64))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Gather ``keys`` (B, D) from all ranks and write them at the pointer."""
        if keys.ndim != 2 or keys.shape[1] != self.keys.shape[1]:
            raise ValueError(
                f"Queue.enqueue: keys must be (B, {self.keys.shape[1]}), got {tuple(keys.shape)}"
            )
        all_keys = gather_no_grad(keys.detach(), group=self.process_group)
        n = all_keys.shape[0]
        if n > self.size:
            raise ValueError(
                f"Queue.enqueue: {n} keys per step (all ranks) exceed method.queue_size="
                f"{self.size}"
            )
        # Tensor arithmetic keeps the pointer on the device: no host sync per step.
        idx = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys.index_copy_(0, idx, all_keys.to(self.keys.dtype))
        self.ptr.copy_((self.ptr + n) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.keys.shape[1]}"


class FeatureQueue(Queue):
    """SwAV's queue of past projections (one queue per global crop), for small batches.

    A :class:`Queue` (gathered from all ranks, identical on every rank) that starts empty
    (zeros, as the official code) and counts the rows written so far (``filled``, a buffer):
    SwAV adds the queue to the Sinkhorn columns only once it is :attr:`full`. Under DDP
    each rank passes only its block of rows (:meth:`rank_rows`) to the loss, whose Sinkhorn
    sums are all-reduced: the ranks' blocks together are the whole queue once, so W ranks
    get the codes of 1 rank with the whole batch and the whole queue (the official code
    keeps a separate queue of ``queue_length / W`` rows per rank instead, which a checkpoint
    of rank 0 cannot restore on another number of ranks).
    """

    filled: torch.Tensor

    def __init__(self, size: int, dim: int, *,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__(size, dim, process_group=process_group)
        self.keys.zero_()
        self.register_buffer("filled", torch.zeros((), dtype=torch.int64))
        self._filled = 0  # host mirror: reading the buffer each step would sync the device
        self.register_load_state_dict_post_hook(FeatureQueue._sync_host_mirror)

    @staticmethod
    def _sync_host_mirror(module: nn.Module, _incompatible: object) -> None:
        module._filled = int(module.filled)

    @property
    def full(self) -> bool:
        """Whether every row holds a real projection (SwAV uses the queue from then on)."""
        return self._filled >= self.size

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Gather ``keys`` (B, D) from all ranks, write them and count them."""
        super().enqueue(keys)
        written = int(keys.shape[0]) * get_world_size(self.process_group)
        self._filled = min(self._filled + written, self.size)
        self.filled.fill_(self._filled)

    def rank_rows(self) -> torch.Tensor:
        """This rank's block of the queue: rows ``[r * size / W, (r + 1) * size / W)``."""
        world = get_world_size(self.process_group)
        if self.size % world:
            raise ValueError(
                f"the SwAV queue size method.queue_size={self.size} must be divisible by the "
                f"number of ranks ({world})")
        n = self.size // world
        start = get_rank(self.process_group) * n
        return self.keys[start:start + n]


class DINOCenter(nn.Module):
    """DINO's teacher center: an EMA of the mean teacher output over the GLOBAL batch.

    ``update`` takes this rank's teacher outputs (the global crops), all-reduces their sum
    and count over the process group, and moves ``center <- m * center + (1 - m) * mean``
    (the official ``update_center``; m = 0.9). The mean is exact under DDP: W ranks x B
    give the center of 1 rank x W*B. The center is a buffer (``state_dict`` restores it).

    Example:
        >>> from sslstream.models.objectives import dino_loss
        >>> center = DINOCenter(64)
        >>> student = [torch.randn(8, 64) for _ in range(4)]   # 2 global + 2 local crops
        >>> teacher = [torch.randn(8, 64) for _ in range(2)]   # the global crops
        >>> loss, _ = dino_loss(student, teacher, center.center, teacher_temp=0.04)
        >>> center.update(teacher)               # after the loss, before the next step
    """

    center: torch.Tensor

    def __init__(self, dim: int, momentum: float = 0.9, *,
                 process_group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        if dim < 1:
            raise ValueError(f"method.out_dim (the DINO center's width) must be >= 1, got {dim}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"method.center_momentum must be in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.process_group = process_group
        self.register_buffer("center", torch.zeros(1, int(dim)))

    @torch.no_grad()
    def update(self, teacher: torch.Tensor | Sequence[torch.Tensor]) -> None:
        """Fold the batch mean of ``teacher`` ((N, K) or a list of (B, K), all ranks) in."""
        out = teacher if isinstance(teacher, torch.Tensor) else torch.cat(list(teacher))
        if out.ndim != 2 or out.shape[1] != self.center.shape[1]:
            raise ValueError(f"DINOCenter.update: teacher outputs must be (N, "
                             f"{self.center.shape[1]}), got {tuple(out.shape)}")
        total = out.detach().to(self.center.dtype).sum(dim=0, keepdim=True)
        world = get_world_size(self.process_group)
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.SUM, group=self.process_group)
        batch_center = total / (out.shape[0] * world)
        self.center.copy_(self.center * self.momentum + batch_center * (1.0 - self.momentum))

    def extra_repr(self) -> str:
        return f"dim={self.center.shape[1]}, momentum={self.momentum}"
