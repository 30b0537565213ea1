"""The epoch plan: which samples each rank reads, as a pure function of the shard counts.

Why this shape: DDP hangs when ranks take different step counts (webdataset's
split_by_node over uneven shards gave two ranks 33 and 24 samples). Here the shards, in a
(seed, epoch) permutation, are laid end to end into one global index space of N samples;
rank r reads the contiguous slice [r*L, (r+1)*L). With `exact_epoch` L = ceil(N/W) and
the last W*L - N positions wrap around to the start (padding, counted); without it
L = floor(N/W) and the tail of the permuted order is dropped this epoch. A rank's slice
touches few shards (good for object stores) and moves to other shards every epoch.
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Segment", "mix_seed", "per_rank", "rank_segments", "shard_order"]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) (key order inside the tar) of shard number `shard`."""

    shard: int
    start: int
    stop: int
    padded: bool = False  # comes from a wrap-around position (exact_epoch padding)

    def __len__(self) -> int:
        return self.stop - self.start


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(num_shards))
    if shuffle:
        random.Random(mix_seed(seed, epoch, 0x5EED)).shuffle(order)
    return order


def per_rank(total: int, world_size: int, exact_epoch: bool) -> int:
    """Samples every rank yields per epoch."""
    return -(-total // world_size) if exact_epoch else total // world_size


def rank_segments(
    counts: Sequence[int], order: Sequence[int], rank: int, world_size: int, exact_epoch: bool
) -> list[Segment]:
    """The segments rank `rank` reads this epoch, in reading order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    total = sum(counts)
    length = per_rank(total, world_size, exact_epoch)
    lo, hi = rank * length, (rank + 1) * length
    # Cumulative start of each shard in the permuted global order.
    starts, pos = [], 0
    for s in order:
        starts.append(pos)
        pos += counts[s]
    out: list[Segment] = []
    g = lo
    while g < hi:
        padded = g >= total
        x = g % total  # wrap-around for padding
        # Rightmost shard starting at or before x: it contains x (empty shards share the
        # start of the next one, so they are never picked).
        i = bisect.bisect_right(starts, x) - 1
        s, off = order[i], x - starts[i]
        take = min(counts[s] - off, hi - g, (total - x))
        out.append(Segment(s, off, off + take, padded))
        g += take
    return out
