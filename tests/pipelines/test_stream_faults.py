"""Corrupt input: each case with its expected outcome (skip + count, warn, or a clear error)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sslstream.pipelines.shards.storage import ShardNotFound
from sslstream.pipelines.shards.stream import BadDataError, ShardStream


@pytest.mark.parametrize(
    ("kind", "counter"),
    [("bad_header", "bad_image"), ("cut_jpeg", "bad_image"), ("empty", "empty"),
     ("missing_image", "missing_image"), ("bad_label", "bad_label")],
)
@pytest.mark.timeout(60)
def test_corrupt_sample_is_skipped_and_counted(shard_factory, kind: str, counter: str) -> None:
    ss = shard_factory([6, 5, 7], corrupt={(1, 2): kind, (2, 0): kind})
    s = ShardStream(str(ss.root), num_workers=2, max_bad_fraction=0.2)
    got = list(s)
    keys = [g.key for g in got]
    assert len(got) == len(s) == 18  # length holds: two top-ups
    assert set(keys) == ss.good_keys  # nothing corrupt came through, nothing good was lost
    assert all(g.label == ss.labels[g.key] for g in got)
    c = s.counters
    assert c[counter] == 2 and c["skipped_corrupt"] == 2 and c["topped_up"] == 2
    # The slice, then the top-up re-reads the head of the slice until two good samples.
    assert 18 + 2 <= c["read"] <= 18 + 4


@pytest.mark.timeout(60)
def test_corrupt_samples_on_one_rank_do_not_unbalance_ranks(shard_factory) -> None:
    ss = shard_factory([8, 8, 8, 8], corrupt={(0, i): "bad_header" for i in range(3)})
    counts, seen = [], set()
    for r in range(2):
        s = ShardStream(str(ss.root), rank=r, world_size=2, num_workers=2, max_bad_fraction=0.25,
                        exact_epoch=True)
        keys = [g.key for g in s]
        counts.append(len(keys))
        seen |= set(keys)
    assert counts == [16, 16]
    assert seen == ss.good_keys


@pytest.mark.timeout(60)
def test_truncated_shard_keeps_what_was_read_and_warns(shard_factory, caplog: pytest.LogCaptureFixture) -> None:
    ss = shard_factory([10, 10, 10], truncate={1: 0.55})
    caplog.set_level(logging.WARNING)
    s = ShardStream(str(ss.root), num_workers=2, shuffle=False, max_bad_fraction=0.5)
    keys = [g.key for g in s]
    assert len(keys) == 30
    c = s.counters
    assert c["truncated_shards"] == 1 and 3 <= c["lost"] <= 6
    kept = [k for k in keys if k.startswith("shard01_")]
    assert len(set(kept)) == 10 - c["lost"]
    assert sorted(set(kept)) == [f"shard01_{i:04d}" for i in range(10 - c["lost"])]  # the head is kept
    assert any("shard-000001.tar ended early" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_truncated_gzip_shard(shard_factory) -> None:
    ss = shard_factory([12, 12], compress=True, truncate={0: 0.6})
    s = ShardStream(str(ss.root), num_workers=1, shuffle=False, max_bad_fraction=1.0)
    keys = [g.key for g in s]
    assert len(keys) == 24 and s.counters["truncated_shards"] == 1 and s.counters["lost"] > 0


@pytest.mark.timeout(60)
def test_too_many_bad_samples_stop_with_an_error_naming_the_shard(shard_factory) -> None:
    ss = shard_factory([10, 10, 10], corrupt={(2, i): "bad_header" for i in range(6)})
    s = ShardStream(str(ss.root), num_workers=2, max_bad_fraction=0.1)
    with pytest.raises(BadDataError, match="max_bad_fraction=0.1") as e:
        list(s)
    assert e.value.shard == ss.urls[2]
    assert ss.urls[2] in str(e.value)


@pytest.mark.timeout(60)
def test_missing_shard_is_an_error_naming_the_url(shard_factory) -> None:
    ss = shard_factory([5, 5, 5])
    Path(ss.urls[1]).unlink()
    with pytest.raises(ShardNotFound) as e:  # the folder's manifest lists it: found at once
        list(ShardStream(str(ss.root), num_workers=2))
    assert ss.urls[1] in str(e.value) and e.value.url == ss.urls[1]
    assert "sslstream shards index" in str(e.value)
    pattern = str(ss.root / "shard-{000000..000002}.tar")  # named one by one: found on read
    s = ShardStream(pattern, num_workers=2)
    with pytest.raises(ShardNotFound) as e:
        list(s)
    assert e.value.url == ss.urls[1]
    with pytest.raises(ShardNotFound, match="no manifest.json and no"):
        ShardStream(str(ss.root / "nothing-here"))


@pytest.mark.timeout(60)
def test_decode_validation_and_shard_without_labels(shard_factory) -> None:
    ss = shard_factory([4, 4], labels=False, corrupt={(0, 1): "cut_jpeg"})
    s = ShardStream(str(ss.root), validate="decode", num_workers=1, max_bad_fraction=0.2)
    got = list(s)
    assert {g.key for g in got} == ss.good_keys and all(g.label == -1 for g in got)
    assert s.counters["bad_image"] == 1
