"""Evaluation reads: each rank reads only its share of a split, every sample scored once."""

from __future__ import annotations

import os

import pytest
from sslstream.pipelines.shards import cache as cache_mod
from sslstream.pipelines.shards.plan import partition_bounds, partition_segments, spread_shards
from sslstream.pipelines.views.eval_loader import build_eval_loader


def test_partition_covers_every_position_once():
    counts = [7, 0, 5, 9, 4]
    for world in (1, 2, 3, 4, 7, 30):
        seen = []
        for rank in range(world):
            lo, hi = partition_bounds(sum(counts), rank, world)
            segs = partition_segments(counts, rank, world)
            assert sum(len(s) for s in segs) == hi - lo
            starts = [sum(counts[:s.shard]) for s in segs]
            seen += [st + i for st, s in zip(starts, segs, strict=True) for i in range(s.start, s.stop)]
        assert seen == list(range(sum(counts)))  # in order, no gap, no repeat
        sizes = [partition_bounds(25, r, world)[1] - partition_bounds(25, r, world)[0] for r in range(world)]
        assert max(sizes) - min(sizes) <= 1


def test_spread_shards_is_even_and_sufficient():
    counts = [10] * 10
    assert spread_shards(counts, 0) == list(range(10))
    assert spread_shards(counts, 25) == [0, 3, 6]
    assert spread_shards(counts, 10) == [0]
    assert spread_shards(counts, 1000) == list(range(10))
    assert spread_shards([5, 50, 5, 5], 20) == [0, 1, 2]  # [0] and [0, 2] hold too few


class _Counting:
    """A shard reader that counts the bytes the tar parser takes from storage."""

    def __init__(self, f, tally: list[int]) -> None:
        self.f, self.tally = f, tally

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self.tally[0] += len(b)
        return b

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.mark.timeout(60)
def test_each_rank_reads_only_its_share(shard_factory, monkeypatch):
    """25 samples in 4 shards over 3 ranks (25 % 3 != 0): the ranks read 8, 8 and 9
    members, together every sample exactly once (a corrupt one skipped and counted), and
    the bytes each rank's parser takes from storage are about its share, not the split."""
    shards = shard_factory([7, 5, 9, 4], corrupt={(2, 3): "bad_header"})
    sizes = [os.path.getsize(u) for u in shards.urls]
    real_open = cache_mod.open_reader
    tally = [0]
    monkeypatch.setattr(cache_mod, "open_reader", lambda *a, **k: _Counting(real_open(*a, **k), tally))
    index, labels, read, nbytes, skipped = [], [], [], [], 0
    for rank in range(3):
        tally[0] = 0
        ev = build_eval_loader(shards.urls, image_size=16, batch_size=4, device="cpu", rank=rank,
                               world_size=3, num_workers=2, backend="torchvision", with_index=True,
                               max_bad_fraction=0.2)
        try:
            batches = list(ev)
        finally:
            ev.close()
        assert len(batches) <= len(ev)
        index += [int(i) for _, _, ix in batches for i in ix]
        labels += [int(v) for _, y, _ in batches for v in y]
        read.append(ev.stream.counters["read"])
        skipped += ev.stream.counters["skipped_corrupt"]
        nbytes.append(tally[0])
    assert read == [8, 8, 9]
    assert skipped == 1
    corrupt_at = 7 + 5 + 3
    assert sorted(index) == [i for i in range(25) if i != corrupt_at]
    keys = [k for ks in shards.keys for k in ks]
    assert labels == [shards.labels[keys[i]] for i in index]  # the index names the sample
    # each rank's parser read its share plus at most one shard it starts inside of
    assert sum(nbytes) <= sum(sizes) + 2 * max(sizes), (nbytes, sizes)
    assert max(nbytes) < 0.75 * sum(sizes), (nbytes, sizes)


@pytest.mark.timeout(60)
def test_max_samples_reads_spread_whole_shards(shard_factory):
    shards = shard_factory([10] * 6)
    index = []
    for rank in range(2):
        ev = build_eval_loader(shards.urls, image_size=16, batch_size=8, device="cpu", rank=rank,
                               world_size=2, num_workers=1, backend="torchvision",
                               with_index=True, max_samples=15)
        try:
            index += [int(i) for _, _, ix in ev for i in ix]
            assert [os.path.basename(u) for u in ev.stream.shard_urls] == [
                os.path.basename(shards.urls[0]), os.path.basename(shards.urls[3])]
        finally:
            ev.close()
    assert sorted(index) == list(range(20))
