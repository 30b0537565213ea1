"""An epoch stopped at W ranks and continued at W' ranks (pipelines/shards/elastic.py): every
sample of the epoch is seen once across the two parts, whatever the shard sizes, lanes,
shuffle buffer or bad samples; the only repeats are the ones the streams count (padding,
top-ups replacing bad samples)."""

from __future__ import annotations

import collections
import json
import random

import pytest
from sslstream.pipelines.shards import elastic
from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.plan import Segment, layout, picked
from sslstream.pipelines.shards.resume import EpochLog, unfinished
from sslstream.pipelines.shards.stream import ShardStream

EPOCH = 2


def _part(urls, world: int, kw: dict, take: int | None, state: dict | None = None
          ) -> tuple[list[list[str]], list[dict], collections.Counter]:
    """Every rank of `world` reads `take` samples (None: the rest of the epoch) from the
    epoch's start, or from `state` (a request every rank loads); their keys and cursors."""
    keys, cursors, counts = [], [], collections.Counter()
    for r in range(world):
        s = ShardStream(urls, rank=r, world_size=world, **kw)
        if state is not None:
            s.load_state_dict(json.loads(json.dumps(state)))  # as stored in a checkpoint
        s.set_epoch(EPOCH)
        got = []
        it = iter(s)
        for x in it:
            got.append(x.key)
            if take is not None and len(got) == take:
                break
        it.close()
        if take is None:
            base = state["position"] if state is not None else 0
            assert len(got) == len(s) - base, f"rank {r} of {world} read {len(got)}"
        keys.append(got)
        cursors.append(json.loads(json.dumps(s.state_dict())))
        counts.update({k: v for k, v in s.counters.items() if k in ("padded", "topped_up")})
    return keys, cursors, counts


def _check_once(whole: set[str], parts: list[list[list[str]]], counts: collections.Counter
                ) -> None:
    """Every sample `whole` (an uninterrupted epoch's) is seen, the repeats are counted."""
    seen = collections.Counter(k for part in parts for rank in part for k in rank)
    assert set(seen) == whole, "every sample of the epoch is seen"
    extra = sum(seen.values()) - len(seen)
    assert extra == counts["padded"] + counts["topped_up"], (extra, counts)


CASES = [  # (W, W', per-rank batch at W, steps done, lanes, shuffle buffer)
    (2, 3, 6, 2, 2, 8),
    (3, 1, 2, 3, 1, 1),
    (2, 2, 4, 3, 3, 5),
    (1, 4, 8, 2, 0, 16),
    (4, 2, 2, 2, 2, 4),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}to{c[1]}-lanes{c[4]}-buf{c[5]}")
def test_every_sample_once_across_a_change_of_world_size(shard_factory, case) -> None:
    w, w2, b, k, lanes, buffer = case
    ss = shard_factory([17, 5, 23, 0, 9, 14],  # 68 samples, uneven, one empty shard
                       corrupt={(0, 3): "bad_header", (2, 5): "empty", (2, 6): "cut_jpeg",
                                (5, 0): "missing_image"}, truncate={4: 0.6})
    kw = {"num_workers": lanes, "seed": 5, "shuffle_buffer": buffer, "exact_epoch": True,
          "max_bad_fraction": 0.5}
    whole, _, _ = _part(str(ss.root), w, kw, take=None)
    readable = {k for rank in whole for k in rank}
    assert readable == ss.good_keys - {"shard04_0006", "shard04_0007", "shard04_0008"}  # cut off
    first, cursors, c1 = _part(str(ss.root), w, kw, take=k * b)
    req = elastic.request(cursors, base=k * b * w // w2)
    second, _, c2 = _part(str(ss.root), w2, kw, take=None, state=req)
    _check_once(readable, [first, second], c1 + c2)


@pytest.mark.timeout(120)
def test_a_continued_epoch_stops_and_continues_again(shard_factory) -> None:
    """2 ranks -> 3 ranks (stopped again mid-way) -> 1 rank, and the 3-rank part resumed on
    3 ranks from its own cursors: the same samples as not stopping there."""
    ss = shard_factory([11, 19, 4, 16, 10], corrupt={(1, 2): "bad_header", (3, 9): "empty"})
    kw = {"num_workers": 2, "seed": 1, "shuffle_buffer": 6, "exact_epoch": True,
          "max_bad_fraction": 0.5}
    root = str(ss.root)
    first, cur1, c1 = _part(root, 2, kw, take=12)          # global batch 12: 2 x 6
    req = elastic.request(cur1, base=8)                    # 3 x 4
    second, cur2, c2 = _part(root, 3, kw, take=4, state=req)  # one more step on 3 ranks
    for r, c in enumerate(cur2):
        assert c["origin"] == req["origin"] and c["position"] == 12 and c["rank"] == r
    third, _, c3 = _part(root, 1, kw, take=None, state=elastic.request(cur2, base=36))
    _check_once(ss.good_keys, [first, second, third], c1 + c2 + c3)
    # the 3-rank part resumed on 3 ranks from its own cursors = never stopped
    whole, _, _ = _part(root, 3, kw, take=None, state=req)
    for r in range(3):
        s = ShardStream(root, rank=r, world_size=3, **kw)
        s.load_state_dict(cur2[r])
        s.set_epoch(EPOCH)
        assert [x.key for x in s] == whole[r][4:], f"rank {r}"


@pytest.mark.timeout(60)
def test_without_exact_epoch_the_second_part_reads_what_the_first_left(uneven_shards) -> None:
    kw = {"num_workers": 2, "seed": 3, "shuffle_buffer": 4}
    root = str(uneven_shards.root)
    first, cur, _ = _part(root, 3, kw, take=10)        # 61 samples: 20 per rank, one dropped
    second, _, c2 = _part(root, 2, kw, take=None, state=elastic.request(cur, base=15))
    flat = [k for part in (first, second) for rank in part for k in rank]
    assert len(flat) == 60 and len(set(flat)) == 60 and not c2["padded"]
    s = ShardStream(root, rank=0, world_size=3, **kw)
    s.set_epoch(EPOCH)
    dropped = uneven_shards.good_keys - set(flat)
    assert len(dropped) == 1  # the tail the 3-rank plan left out of this epoch


@pytest.mark.timeout(60)
def test_cursors_of_other_data_are_refused(shard_factory) -> None:
    a = shard_factory([6, 6])
    b = shard_factory([6, 7])
    kw = {"num_workers": 1, "seed": 0, "shuffle_buffer": 2}
    _, cur, _ = _part(str(a.root), 2, kw, take=2)
    s = ShardStream(str(b.root), rank=0, world_size=3, **kw)
    with pytest.raises(DataError, match="cannot continue the epoch from rank 0 of 2"):
        s.load_state_dict(elastic.request(cur, base=1))
    # another seed changes the global order: refused too
    s = ShardStream(str(a.root), rank=0, world_size=1, **{**kw, "seed": 1})
    with pytest.raises(DataError, match="seed"):
        s.load_state_dict(elastic.request(cur, base=4))
    # other lanes and buffer are fine: the old ranks are replayed as they were
    s = ShardStream(str(a.root), rank=0, world_size=1, num_workers=3, seed=0, shuffle_buffer=9)
    s.load_state_dict(elastic.request(cur, base=4))
    s.set_epoch(EPOCH)
    assert len(list(s)) == len(s) - 4


def test_unfinished_is_what_a_plain_replay_did_not_yield() -> None:
    """`unfinished` against a brute-force replay of the stream's order (lanes merged
    round-robin, top-ups, shuffle buffer), written plainly here: the plan's samples minus
    those among the first `position` outputs, minus the known bad ones."""
    rng = random.Random(0)
    for trial in range(400):
        counts = [rng.choice([1, 3, 8, 13]) for _ in range(rng.randint(1, 6))]
        pieces = [Segment(s, 0, n) for s, n in enumerate(counts)]
        if trial % 2:  # a plan of sparse segments, as a continued epoch has
            pieces = [picked(s, sorted(rng.sample(range(n), k=max(1, n // 2))))
                      for s, n in enumerate(counts)]
        length = sum(len(p) for p in pieces)
        segs = layout(pieces, 0, length)
        everything = [(si, i) for si, sg in enumerate(segs) for i in sg.indices()]
        bad = set(rng.sample(everything, k=min(len(everything) - 1, rng.randint(0, 3))))
        log = EpochLog(bad, {})
        k, buf, seed = rng.randint(1, 3), rng.choice([1, 2, 5]), rng.choice([None, 7])
        out = _replay(segs, k, bad, length, buf, seed)
        position = rng.randint(0, length)
        left = unfinished(segs, k, log, length, position, buf, seed)
        got = [(s.shard, i) for s in left for i in s.indices()]
        want = {(segs[si].shard, i) for si, i in everything} - \
            {(segs[si].shard, i) for si, i in set(out[:position]) | bad}
        assert sorted(got) == sorted(want) and len(got) == len(set(got)), trial


def _replay(segs, k, bad, length, buf, seed) -> list[tuple[int, int]]:
    """The whole epoch's output order of one rank, as refs (segment, index)."""
    def goods(order):
        return [(si, i) for si in order for i in segs[si].indices() if (si, i) not in bad]

    lanes = min(k, len(segs))
    queues = {j: collections.deque(goods(range(j, len(segs), lanes))) for j in range(lanes)}
    turns, merged = collections.deque(range(lanes)), []
    while turns and len(merged) < length:
        j = turns.popleft()
        if queues[j]:
            merged.append(queues[j].popleft())
            turns.append(j)
    again = goods(range(len(segs)))
    while len(merged) < length:
        merged.extend(again[: length - len(merged)])
    if seed is None or buf <= 1:
        return merged
    r, pool, out = random.Random(seed), [], []
    for x in merged:
        if len(pool) < buf:
            pool.append(x)
            continue
        j = r.randrange(len(pool))
        out.append(pool[j])
        pool[j] = x
    r.shuffle(pool)
    return out + pool


def test_picked_segments_read_only_their_samples(shard_factory) -> None:
    ss = shard_factory([12])
    from sslstream.pipelines.shards.reader import Good, LaneReader

    seg = picked(0, [1, 2, 7, 11])
    assert len(seg) == 4 and seg.holds(7) and not seg.holds(3) and seg.after(2) == 7
    assert seg.nth(4) == 12 and seg.count_below(8) == 3
    assert picked(0, [4, 5, 6]) == Segment(0, 4, 7)
    reader = LaneReader(ss.urls, [seg], lanes=0, storage_options=None, num_classes=None,
                        validate="header", count=lambda n, k=1: None)
    keys = [x.key for x in reader if isinstance(x, Good)]
    assert keys == [ss.keys[0][i] for i in (1, 2, 7, 11)]
