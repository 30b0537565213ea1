"""Resuming a checkpoint on another number of ranks: each new rank's loader state and RNG.

Why this is possible: an epoch's global sample order depends on (data, seed, epoch) only
(pipelines/shards/plan.py), and the checkpoint holds every old rank's stream cursor
(`loaders`, rank order). Every new rank loads the same request built from all of them
(pipelines/shards/elastic.py: what the old ranks left of the epoch, cut into equal slices
for the new ranks), so every sample of the interrupted epoch is trained on once across the
two parts. The global batch is the checkpoint's (orchestration/train/lineage.py sets the
per-rank batch to its share), so the run's step count per epoch, learning rate and
schedules stay what they were, up to the rounding of a different number of ranks.

The RNG states of the old ranks go to the new ranks of the same number; a new rank beyond
them starts from a seed of (run seed, step, rank): nothing of the sample order depends on
them (the views' parameters are drawn from (seed, epoch, rank, batch): pipelines/views).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from sslstream.orchestration.errors import UserError
from sslstream.orchestration.runtime.checkpoint import set_rng_state
from sslstream.pipelines.shards import elastic
from sslstream.pipelines.shards.plan import mix_seed

__all__ = ["continued_loader_state", "restore_rng"]


def continued_loader_state(saved: Sequence[dict[str, Any]], epoch_step: int,
                           batch_size: int) -> dict[str, Any]:
    """The loader state that continues the epoch of `saved` (every old rank's loader state,
    in rank order) after `epoch_step` global batches, for a loader of `batch_size` samples
    per rank: the same state on every new rank (each reads its own share of it)."""
    cursors = [st.get("stream") for st in saved]
    if any(c is None for c in cursors):
        missing = [r for r, c in enumerate(cursors) if c is None]
        raise UserError(f"the checkpoint has no stream cursor for rank(s) {missing} of "
                        f"{len(saved)} mid-epoch: it can only be resumed on {len(saved)} "
                        "rank(s)")
    first = saved[0]
    return {"epoch": int(first["epoch"]), "batch": int(epoch_step), "seed": int(first["seed"]),
            "batch_size": int(batch_size), "recipe": first.get("recipe"),
            "stream": elastic.request(cursors, base=int(epoch_step) * int(batch_size))}


def restore_rng(saved: Sequence[dict[str, Any]], rank: int, seed: int, step: int) -> None:
    """Rank `rank`'s RNG states: the saved ones of the same rank, else fresh ones seeded
    from (seed, step, rank)."""
    if rank < len(saved):
        set_rng_state(saved[rank])
        return
    s = mix_seed(seed, step, rank, 0xE1A5)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)
