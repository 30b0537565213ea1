"""The epoch plan: which samples each rank reads, as a pure function of the shard counts.

Why this shape: DDP hangs when ranks take different step counts (webdataset's
split_by_node over uneven shards gave two ranks 33 and 24 samples). Here an epoch's
*pieces* (whole shards, or parts of shards when sources are mixed: pipelines/shards/mix.py),
in a (seed, epoch) permutation, are laid end to end into one global index space of N
samples; rank r reads the contiguous slice [r*L, (r+1)*L). With `exact_epoch` L = ceil(N/W)
and the last W*L - N positions wrap around to the start (padding, counted); without it
L = floor(N/W) and the tail of the permuted order is dropped this epoch. A rank's slice
touches few shards (good for object stores) and moves to other shards every epoch.

The global order of positions depends on (seed, epoch) only, never on W: what W changes is
where the slices are cut. That is what lets a run stopped at W ranks continue the same
epoch on W' ranks (pipelines/shards/elastic.py lays out what is left of it with `layout`).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Segment", "layout", "mix_seed", "partition_bounds", "partition_segments",
           "per_rank", "picked", "pieces_of", "rank_segments", "shard_order",
           "spread_shards", "window"]


@dataclass(frozen=True)
class Segment:
    """Samples [start, stop) (key order inside the tar) of shard number `shard`; with
    `picks`, only those sample indices (sorted, the first is `start`, the last `stop - 1`):
    what is left of a shard that an earlier part of the epoch read in part (elastic.py)."""

    shard: int
    start: int
    stop: int
    padded: bool = False  # comes from a wrap-around position (exact_epoch padding)
    picks: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.picks) if self.picks is not None else self.stop - self.start

    def holds(self, i: int) -> bool:
        """Whether sample index `i` of the shard belongs to this segment."""
        if not self.start <= i < self.stop:
            return False
        if self.picks is None:
            return True
        j = bisect.bisect_left(self.picks, i)
        return j < len(self.picks) and self.picks[j] == i

    def after(self, i: int) -> int:
        """The segment's next sample index after `i` (`stop` when there is none)."""
        if self.picks is None:
            return i + 1
        j = bisect.bisect_right(self.picks, i)
        return self.picks[j] if j < len(self.picks) else self.stop

    def nth(self, n: int) -> int:
        """The sample index of the segment's `n`-th sample (`stop` for n == len)."""
        if self.picks is None:
            return self.start + n
        return self.picks[n] if n < len(self.picks) else self.stop

    def count_below(self, x: int) -> int:
        """How many of the segment's samples have an index below `x`."""
        if self.picks is None:
            return max(0, min(x, self.stop) - self.start)
        return bisect.bisect_left(self.picks, x)

    def indices(self) -> Sequence[int]:
        return self.picks if self.picks is not None else range(self.start, self.stop)

    def part(self, offset: int, take: int, padded: bool | None = None) -> Segment:
        """The segment's samples [offset, offset + take) (positions within it)."""
        pad = self.padded if padded is None else padded
        if self.picks is None:
            return Segment(self.shard, self.start + offset, self.start + offset + take, pad)
        return picked(self.shard, self.picks[offset:offset + take], pad)


def picked(shard: int, indices: Sequence[int], padded: bool = False) -> Segment:
    """A segment of exactly `indices` (sorted, not empty) of `shard`: plain when they are
    consecutive."""
    lo, hi = indices[0], indices[-1] + 1
    if hi - lo == len(indices):
        return Segment(shard, lo, hi, padded)
    return Segment(shard, lo, hi, padded, tuple(indices))


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


def pieces_of(counts: Sequence[int], order: Sequence[int]) -> list[Segment]:
    """Whole shards in `order`: the pieces of an epoch without a weighted mix."""
    return [Segment(s, 0, counts[s]) for s in order]


def rank_segments(
    counts: Sequence[int], order: Sequence[int], rank: int, world_size: int, exact_epoch: bool
) -> list[Segment]:
    """The segments rank `rank` reads this epoch, in reading order."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    return layout(pieces_of(counts, order), rank, per_rank(sum(counts), world_size, exact_epoch))


def layout(pieces: Sequence[Segment], rank: int, length: int) -> list[Segment]:
    """Positions [rank*length, (rank+1)*length) of `pieces` laid end to end, as segments in
    reading order; positions past the end wrap around to the start (padded=True)."""
    return window(pieces, rank * length, (rank + 1) * length)


def window(pieces: Sequence[Segment], lo: int, hi: int) -> list[Segment]:
    """Positions [lo, hi) of `pieces` laid end to end (past the end: wrapped, padded)."""
    total = sum(len(p) for p in pieces)
    if hi > lo and total == 0:
        raise ValueError("no samples to lay out")
    # Cumulative start of each piece in the global order.
    starts, pos = [], 0
    for p in pieces:
        starts.append(pos)
        pos += len(p)
    out: list[Segment] = []
    g = lo
    while g < hi:
        padded = g >= total
        x = g % total  # wrap-around for padding
        # Rightmost piece starting at or before x: it contains x (empty pieces share the
        # start of the next one, so they are never picked).
        i = bisect.bisect_right(starts, x) - 1
        off = x - starts[i]
        take = min(len(pieces[i]) - off, hi - g, (total - x))
        out.append(pieces[i].part(off, take, padded))
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
