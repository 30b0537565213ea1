"""Validation, precision and global-batch plumbing shared by the objectives.

Kept private: the public surface is the loss functions, :class:`LossParts` (re-exported by
the package) and :mod:`.gather`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from sslstream.models.objectives.gather import gather_with_grad, get_rank

_LOW_PRECISION = (torch.float16, torch.bfloat16)


class LossParts(NamedTuple):
    """What every objective returns: ``loss, parts = objective(...)``.

    ``loss`` is the scalar to back-propagate; ``parts`` holds the unweighted terms, detached,
    for logging (``{}`` for the losses that have none). One shape for all objectives, so a
    caller never needs a flag to ask for the parts.
    """

    loss: torch.Tensor
    parts: dict[str, torch.Tensor]


def check_pair(name: str, a: torch.Tensor, b: torch.Tensor, *, min_rows: int = 1) -> None:
    """Raise ValueError unless ``a`` and ``b`` are same-shaped (N, D) floating tensors."""
    for label, t in (("first", a), ("second", b)):
        if t.ndim != 2:
            raise ValueError(
                f"{name}: {label} input must be 2-D (batch, dim), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name}: {label} input must be floating point, got {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(
            f"{name}: inputs must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if a.shape[0] < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} rows per batch, got {a.shape[0]}")


def check_positive(name: str, arg: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}: {arg} must be > 0, got {value!r}")


def upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """fp16/bf16 -> fp32 (float32/float64 unchanged).

    Why: the statistics in these losses (covariances, cross-correlations, softmax over
    thousands of logits at T = 0.1) lose too much in half precision; the embeddings are small,
    so computing the loss in float32 costs nothing next to the backbone.
    """
    return tuple(t.float() if t.dtype in _LOW_PRECISION else t for t in tensors)


@contextlib.contextmanager
def full_precision(device: torch.device) -> Iterator[None]:
    """Disable autocast (which would recast the loss's matmuls to half precision)."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def global_batch(x: torch.Tensor, group: Any, gather: bool) -> torch.Tensor:
    """The global batch (all ranks, rank order) with gradient, or ``x`` when not gathering."""
    return gather_with_grad(x, group) if gather else x


def local_offset(batch: int, group: Any, gather: bool) -> int:
    """Index of this rank's first sample inside :func:`global_batch`."""
    return get_rank(group) * batch if gather else 0


def anchors_and_candidates(
    z1: torch.Tensor, z2: torch.Tensor, group: Any, gather: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Local anchors vs global candidates, as in the official SimCLR.

    Returns ``anchors`` (2B, D) = [z1; z2] of this rank, ``candidates`` (2N, D) =
    [Z1; Z2] of the global batch (N = world_size * B), and for each anchor the candidate index
    of itself (``self_idx``) and of its other view (``pos_idx``).
    """
    batch = z1.shape[0]
    c1, c2 = global_batch(z1, group, gather), global_batch(z2, group, gather)
    n_global = c1.shape[0]
    idx = torch.arange(batch, device=z1.device) + local_offset(batch, group, gather)
    self_idx = torch.cat([idx, idx + n_global])
    pos_idx = torch.cat([idx + n_global, idx])
    return torch.cat([z1, z2]), torch.cat([c1, c2]), self_idx, pos_idx


def off_diagonal(m: torch.Tensor) -> torch.Tensor:
    """The off-diagonal entries of a square matrix, flattened (official VICReg/Barlow trick)."""
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].flatten()
