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

__all__ = ["Segment", "mix_seed", "partition_bounds", "partition_segments", "per_rank",
           "rank_segments", "shard_order", "spread_shards"]


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


def partition_bounds(total: int, rank: int, world_size: int) -> tuple[int, int]:
    """Rank `rank`'s share [lo, hi) of `total` positions when every position goes to
    exactly one rank: contiguous, sizes differ by at most one (evaluation, where ranks need
    not take equal step counts, so nothing is padded or dropped)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    return rank * total // world_size, (rank + 1) * total // world_size


def partition_segments(counts: Sequence[int], rank: int, world_size: int) -> list[Segment]:
    """The segments of rank `rank`'s share of the shards in their listed order: a
    contiguous run of positions, so a rank opens only the shards its share touches (at
    most two of them partly) and the W shares together cover every sample exactly once."""
    lo, hi = partition_bounds(sum(counts), rank, world_size)
    out: list[Segment] = []
    start = 0
    for s, n in enumerate(counts):
        a, b = max(lo, start), min(hi, start + n)
        if a < b:
            out.append(Segment(s, a - start, b - start))
        start += n
    return out


def spread_shards(counts: Sequence[int], want: int) -> list[int]:
    """As few shards as hold `want` samples, spread evenly over the list (deterministic).

    Why spread and not the first ones: shards written in class order would otherwise give a
    bank of a few classes. Returns every shard when they hold fewer than `want` samples.
    """
    n = len(counts)
    if want <= 0 or want >= sum(counts):
        return list(range(n))
    for pick in range(1, n + 1):
        chosen = sorted({(i * n) // pick for i in range(pick)})
        if sum(counts[s] for s in chosen) >= want:
            return chosen
    return list(range(n))
