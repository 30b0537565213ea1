"""ShardStream splitting: equal per-rank counts, coverage, ordering, URL forms."""

from __future__ import annotations

import collections
import random
from pathlib import Path

import pytest
from sslstream.pipelines.shards.plan import per_rank, rank_segments, shard_order
from sslstream.pipelines.shards.stream import ShardStream

from tests.fixtures.shards import ShardSet


def _keys(stream: ShardStream) -> list[str]:
    return [s.key for s in stream]


def _ranks(urls: object, world: int, epoch: int = 0, **kw: object) -> list[list[str]]:
    out = []
    for r in range(world):
        s = ShardStream(urls, rank=r, world_size=world, **kw)  # type: ignore[arg-type]
        s.set_epoch(epoch)
        out.append(_keys(s))
        assert len(out[-1]) == len(s)
    return out


@pytest.mark.timeout(60)
def test_two_ranks_two_workers_uneven_shards_exact_epoch(uneven_shards: ShardSet) -> None:
    root = str(uneven_shards.root)
    n = 61  # 17 + 5 + 23 + 9 + 7
    kw = {"num_workers": 2, "seed": 3, "shuffle_buffer": 16, "exact_epoch": True}
    e0 = _ranks(root, 2, epoch=0, **kw)
    assert [len(k) for k in e0] == [31, 31]  # ceil(61 / 2) on both ranks
    all0 = e0[0] + e0[1]
    assert set(all0) == uneven_shards.good_keys  # complete
    dup = [k for k, c in collections.Counter(all0).items() if c > 1]
    assert len(all0) - len(set(all0)) == 1 and len(dup) == 1  # one padded position, no other overlap
    e1 = _ranks(root, 2, epoch=1, **kw)
    assert set(e1[0] + e1[1]) == uneven_shards.good_keys
    assert e1[0] != e0[0] and set(e1[0]) != set(e0[0])  # shard sets move across epochs
    again = _ranks(root, 2, epoch=0, **kw)
    assert again == e0  # same seed, same epoch: same order
    other = _ranks(root, 2, epoch=0, **{**kw, "seed": 4})
    assert other != e0
    padded = 0
    for r in range(2):
        s = ShardStream(root, rank=r, world_size=2, **kw)
        _keys(s)
        padded += s.counters["padded"]
    assert padded == len(all0) - n == 1  # the padding is counted


@pytest.mark.timeout(60)
def test_without_exact_epoch_ranks_drop_the_remainder(uneven_shards: ShardSet) -> None:
    ks = _ranks(str(uneven_shards.root), 3, num_workers=2, exact_epoch=False, shuffle_buffer=8)
    assert [len(k) for k in ks] == [20, 20, 20]  # floor(61 / 3)
    flat = [k for r in ks for k in r]
    assert len(set(flat)) == 60  # disjoint, one sample dropped this epoch


def test_plan_balances_any_shard_sizes() -> None:
    """Property check of the plan: equal lengths, exact cover plus wrap-around padding."""
    rng = random.Random(0)
    for _ in range(300):
        counts = [rng.choice([0, 1, 2, 5, 17, 100]) for _ in range(rng.randint(1, 9))]
        if sum(counts) == 0:
            continue
        world, exact = rng.randint(1, 8), rng.random() < 0.5
        order = shard_order(len(counts), rng.randint(0, 9), rng.randint(0, 9), True)
        total = sum(counts)
        length = per_rank(total, world, exact)
        seen: collections.Counter = collections.Counter()
        for r in range(world):
            segs = rank_segments(counts, order, r, world, exact)
            assert sum(len(s) for s in segs) == length
            for s in segs:
                assert 0 <= s.start < s.stop <= counts[s.shard]
                seen.update((s.shard, i) for i in range(s.start, s.stop))
        everything = {(s, i) for s, c in enumerate(counts) for i in range(c)}
        if exact:
            assert set(seen) == everything and sum(seen.values()) == world * length
            assert sum(seen.values()) - total < world  # padding is less than one per rank
        else:
            assert set(seen) <= everything and all(v == 1 for v in seen.values())
            assert total - len(seen) < world


@pytest.mark.timeout(60)
def test_unshuffled_order_and_labels(uneven_shards: ShardSet) -> None:
    s = ShardStream(str(uneven_shards.root), num_workers=1, shuffle=False)
    got = list(s)
    assert [g.key for g in got] == [k for ks in uneven_shards.keys for k in ks]  # tar order
    assert all(g.label == uneven_shards.labels[g.key] for g in got)
    assert got[0].shard == uneven_shards.urls[0]
    assert got[0].image[:2] == b"\xff\xd8"


@pytest.mark.timeout(60)
def test_url_forms_give_the_same_samples(shard_factory, tmp_path: Path) -> None:
    ss = shard_factory([4, 6, 3])
    ref = sorted(ss.good_keys)
    root = ss.root
    forms = [
        str(root),
        str(root / "manifest.json"),
        f"file://{root}",
        str(root / "shard-{000000..000002}.tar"),
        [str(root / "shard-000000.tar"), str(root / "shard-{000001..000002}.tar")],
    ]
    for urls in forms:
        s = ShardStream(urls, num_workers=2)
        assert sorted(_keys(s)) == ref, urls
        assert s.shard_counts == [4, 6, 3], urls  # from the manifest, no counting pass
    (root / "manifest.json").unlink()  # no manifest: one counting pass over the shards
    s = ShardStream(str(root), num_workers=2)
    assert s.shard_counts == [4, 6, 3] and sorted(_keys(s)) == ref


def test_too_few_samples_for_the_ranks_is_a_clear_error(shard_factory) -> None:
    ss = shard_factory([1])
    with pytest.raises(ValueError, match="cannot fill 2 ranks"):
        len(ShardStream(str(ss.root), rank=1, world_size=2))
    assert len(ShardStream(str(ss.root), rank=1, world_size=2, exact_epoch=True)) == 1


@pytest.mark.timeout(90)
def test_cifar10_test_split_two_ranks(cifar10_dir: Path) -> None:
    ks = []
    for r in range(2):
        s = ShardStream(f"{cifar10_dir}#test", rank=r, world_size=2, num_workers=2,
                        exact_epoch=True, shuffle_buffer=500)
        got = list(s)
        assert len(got) == len(s) == 5000
        assert {g.label for g in got} == set(range(10))
        assert s.counters["skipped_corrupt"] == 0 and s.counters["yielded"] == 5000
        ks.append({g.key for g in got})
    assert not ks[0] & ks[1] and len(ks[0] | ks[1]) == 10_000
