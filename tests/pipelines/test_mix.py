"""Weighted mixes of sources (pipelines/shards/mix.py) read by real streams: each epoch's
per-source counts are the configured shares, a rank's stretch of it is within the sampling
error of drawing whole shards, every rank yields the same number of samples over uneven
sources, and a stop mid-epoch resumes exactly, on the same or another number of ranks."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest
from sslstream.pipelines.shards import elastic
from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.mix import parse_sources
from sslstream.pipelines.shards.plan import layout
from sslstream.pipelines.shards.storage import ShardNotFound
from sslstream.pipelines.shards.stream import ShardStream


def _two_sources(shard_factory, a=(5,) * 40, b=(5,) * 20, **kw):
    return shard_factory(list(a), prefix="a", **kw), shard_factory(list(b), prefix="b")


def _source(key: str) -> int:
    return 0 if key.startswith("a") else 1


def _epoch(spec, world: int, epoch: int, **kw) -> list[list[str]]:
    out = []
    for r in range(world):
        s = ShardStream(spec, rank=r, world_size=world, **kw)
        s.set_epoch(epoch)
        out.append([x.key for x in s])
    return out


KW = {"num_workers": 2, "seed": 3, "shuffle_buffer": 16, "exact_epoch": True}


@pytest.mark.timeout(120)
def test_an_epoch_takes_each_source_at_its_weight(shard_factory) -> None:
    a, b = _two_sources(shard_factory)  # 200 + 100 samples, weights 3:1 -> 225 + 75
    spec = [{"url": str(a.root), "weight": 3}, {"url": str(b.root), "weight": 1}]
    s = ShardStream(spec, **KW)
    assert s.source_quotas == [225, 75] and s.epoch_samples == 300
    used_b: set[str] = set()
    for epoch in range(3):
        ranks = _epoch(spec, 4, epoch, **KW)
        assert [len(r) for r in ranks] == [75] * 4
        got = collections.Counter(_source(k) for r in ranks for k in r)
        assert [got[0], got[1]] == [225, 75] == s.source_counts(epoch)
        # source a: one pass (each of its samples once) plus 25 samples of 5 shards
        a_keys = collections.Counter(k for r in ranks for k in r if _source(k) == 0)
        assert set(a_keys) == a.good_keys and sorted(a_keys.values()).count(2) == 25
        used_b |= {k for r in ranks for k in r if _source(k) == 1}
        # each rank's share: within 4 standard deviations of drawing its ~15 pieces
        for r in ranks:
            frac = sum(_source(k) == 0 for k in r) / len(r)
            assert abs(frac - 0.75) <= 4 * math.sqrt(0.75 * 0.25 / 15), (epoch, frac)
    assert len(used_b) > 75, "other shards of the smaller share are taken in other epochs"


@pytest.mark.timeout(120)
def test_samples_and_repeat_take_absolute_counts(shard_factory) -> None:
    a, b = _two_sources(shard_factory, a=(7, 3, 11), b=(4, 9))  # 21 + 13
    spec = [{"url": str(a.root), "samples": 30}, {"url": str(b.root), "repeat": 0.5}]
    ranks = _epoch(spec, 2, 1, **KW)
    got = collections.Counter(_source(k) for r in ranks for k in r)
    assert (got[0], got[1]) == (30, 6) or (got[0], got[1]) == (30, 7)
    assert ShardStream(spec, **KW).source_quotas == [30, round(0.5 * 13)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_equal_rank_lengths_over_uneven_sources(shard_factory, world) -> None:
    a = shard_factory([17, 2, 9], prefix="a", corrupt={(0, 4): "bad_header"})
    b = shard_factory([3, 23], prefix="b")
    spec = [{"url": str(a.root), "weight": 1}, {"url": str(b.root), "weight": 2.5}]
    kw = {**KW, "exact_epoch": False, "max_bad_fraction": 0.2}
    ranks = _epoch(spec, world, 0, **kw)
    n = ShardStream(spec, rank=0, world_size=world, **kw).__len__()
    assert [len(r) for r in ranks] == [n] * world and n == 54 // world


@pytest.mark.timeout(120)
def test_a_mix_resumes_mid_epoch_exactly(shard_factory) -> None:
    a, b = _two_sources(shard_factory, a=(6, 13, 4), b=(9, 5))
    spec = [{"url": str(a.root), "weight": 2}, {"url": str(b.root), "weight": 1}]
    whole = _epoch(spec, 2, 4, **KW)[1]
    s = ShardStream(spec, rank=1, world_size=2, **KW)
    s.set_epoch(4)
    it = iter(s)
    first = [next(it).key for _ in range(7)]
    it.close()
    state = json.loads(json.dumps(s.state_dict()))
    t = ShardStream(spec, rank=1, world_size=2, **KW)
    t.load_state_dict(state)
    t.set_epoch(4)
    assert first + [x.key for x in t] == whole
    assert t.counters["fast_forwarded"] == 7 and t.counters["replayed"] == 0


@pytest.mark.timeout(120)
def test_a_mix_continues_on_another_number_of_ranks(shard_factory) -> None:
    """3 ranks -> 2 ranks mid-epoch: the two parts together are every position of the
    epoch's global order (a multiset: a source read more than once repeats samples by
    design), the 3-rank plan's dropped tail included: 2 ranks x 22 = 44 = the epoch."""
    a, b = _two_sources(shard_factory, a=(6, 13, 4, 7), b=(9, 5))  # 30 + 14: 44 -> 44
    spec = [{"url": str(a.root), "weight": 1}, {"url": str(b.root), "weight": 1}]
    kw = {**KW, "exact_epoch": False}
    whole = collections.Counter(k for r in _epoch(spec, 1, 2, **kw) for k in r)
    assert sum(whole.values()) == 44
    keys, cursors = [], []
    for r in range(3):
        s = ShardStream(spec, rank=r, world_size=3, **kw)
        s.set_epoch(2)
        it = iter(s)
        keys += [next(it).key for _ in range(4)]
        it.close()
        cursors.append(json.loads(json.dumps(s.state_dict())))
    req = elastic.request(cursors, base=6)  # 12 read = 2 ranks x 6
    for r in range(2):
        s = ShardStream(spec, rank=r, world_size=2, **kw)
        s.load_state_dict(req)
        s.set_epoch(2)
        keys += [x.key for x in s]
    assert collections.Counter(keys) == whole


def test_the_plan_counts_what_the_layout_holds() -> None:
    """`Mix.realised` against counting the laid-out segments, with wrap-around padding."""
    from sslstream.pipelines.shards.mix import Mix

    sources = parse_sources([{"url": "a", "weight": 2}, {"url": "b", "weight": 1},
                             {"url": "c", "weight": 1}])
    mix = Mix(tuple(sources), ((0, 3), (3, 4), (4, 6)))
    counts = [5, 8, 2, 11, 3, 6]
    pieces = mix.pieces(counts, seed=1, epoch=0, shuffle=True)
    total = sum(len(p) for p in pieces)
    for world in (1, 3, 7):
        length = -(-total // world)
        segs = [s for r in range(world) for s in layout(pieces, r, length)]
        want = [0, 0, 0]
        for s in segs:
            want[mix.source_of(s.shard)] += len(s)
        assert mix.realised(pieces, world * length) == want


def test_a_source_with_no_samples_or_no_shards_is_named(shard_factory, tmp_path) -> None:
    a = shard_factory([4, 4], prefix="a")
    empty = shard_factory([0], prefix="e")
    spec = [{"url": str(a.root), "weight": 1}, {"url": str(empty.root), "weight": 1}]
    with pytest.raises(DataError, match=r"source 1 of the mix \(.*\) holds no samples"):
        len(ShardStream(spec))
    spec = [{"url": str(a.root), "weight": 1}, {"url": str(tmp_path / "none"), "weight": 1}]
    with pytest.raises(ShardNotFound, match=r"source 1 of the mix \(.*/none\): no manifest"):
        ShardStream(spec)
    secret = [{"url": str(a.root), "weight": 1},
              {"url": "s3://AKIAEXAMPLE:topsecret@nobucket/x-{0..1}.tar", "weight": 1}]
    with pytest.raises(Exception) as e:
        ShardStream(secret, storage_options={"client_kwargs": {
            "endpoint_url": "http://127.0.0.1:9"}, "config_kwargs": {"retries": {"max_attempts": 1}}})
    assert "topsecret" not in str(e.value)


def test_a_snapshot_covers_every_source_and_pins_each_one(shard_factory) -> None:
    """`retrain` watches every source of a mix: a shard changed in the second source is new
    data; the training config keeps the sources and weights, each on its snapshot."""
    import hashlib

    from sslstream.pipelines.shards.snapshot import pin_sources, take_snapshot

    a, b = _two_sources(shard_factory, a=(4, 4), b=(3, 3))
    spec = [{"url": str(a.root), "weight": 3}, {"url": str(b.root), "weight": 1}]
    snap = take_snapshot(spec)
    assert len(snap.shards) == 4
    pinned = pin_sources(spec, snap)
    assert pinned == [{"url": a.urls, "weight": 3}, {"url": b.urls, "weight": 1}]
    # rewrite one shard of source b (and its manifest entry): new data
    doc = json.loads(b.manifest.read_text())
    data = Path(a.urls[0]).read_bytes()
    Path(b.urls[1]).write_bytes(data)
    doc["shards"][1].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    b.manifest.write_text(json.dumps(doc))
    again = take_snapshot(spec)
    assert again.id != snap.id
    assert [s.url for s in again.new_since(snap.fingerprints())] == [b.urls[1]]
