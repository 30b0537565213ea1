"""The local shard cache (pipelines/shards/cache.py) against a real S3 server (moto).

What the store served is counted on the server's side of the wire: every request goes
through `FaultProxy`, which logs each reply and the body bytes it sent, so "epoch 2 reads
nothing" is measured outside the code under test. Order of samples is checked against a
stream without the cache; the LRU eviction against a simple model of it.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
from pathlib import Path

import pytest
from sslstream.pipelines.shards.cache import Expected, ShardCache
from sslstream.pipelines.shards.stream import ShardStream

from tests.fixtures.s3 import FaultProxy, S3Env, s3_options
from tests.fixtures.shards import ShardSet

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]

KW = {"num_workers": 2, "seed": 3, "shuffle_buffer": 8, "exact_epoch": True}


@pytest.fixture
def proxy(s3: S3Env):
    p = FaultProxy(s3.endpoint)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture
def remote(s3: S3Env, uneven_shards: ShardSet) -> tuple[str, ShardSet]:
    s3.bucket("data")
    return s3.upload(uneven_shards.root, "data/train"), uneven_shards


def _epochs(stream: ShardStream, epochs: range, proxy: FaultProxy | None = None):
    """[(keys of epoch e, (GET requests, bytes) served during it)] for each epoch."""
    out = []
    for e in epochs:
        before = proxy.served("GET", "data/train/shard-") if proxy else (0, 0)
        stream.set_epoch(e)
        keys = [(x.key, x.image) for x in stream]
        after = proxy.served("GET", "data/train/shard-") if proxy else (0, 0)
        out.append((keys, (after[0] - before[0], after[1] - before[1])))
    return out


def _cached(cache_dir: Path) -> dict[str, int]:
    """url -> bytes of the entries in the cache folder (read from their records)."""
    out = {}
    for meta in (cache_dir / "objects").glob("*.json"):
        d = json.loads(meta.read_text())
        if (cache_dir / "objects" / meta.stem).exists():
            out[d["url"]] = (cache_dir / "objects" / meta.stem).stat().st_size
    return out


def test_a_full_cache_reads_nothing_from_the_store_in_epoch_two(remote, proxy, tmp_path) -> None:
    url, ss = remote
    sizes = {p.name: p.stat().st_size for p in ss.root.glob("*.tar")}
    opts = s3_options(proxy.endpoint)
    plain = _epochs(ShardStream(url, storage_options=opts, **KW), range(2), proxy)
    cache = tmp_path / "cache"
    s = ShardStream(url, storage_options=opts, cache_dir=str(cache), cache_limit=10**9, **KW)
    cached = _epochs(s, range(2), proxy)
    # the same samples in the same order, with or without the cache
    assert [k for k, _ in cached] == [k for k, _ in plain]
    # without it every epoch reads the set again; with it, epoch 1 once and epoch 2 nothing
    assert plain[1][1][1] >= sum(sizes.values())
    assert cached[0][1] == (len(sizes), sum(sizes.values()))
    assert cached[1][1] == (0, 0)
    c = s.counters
    assert c["cache_fetched"] == 5 and c["cache_fetched_bytes"] == sum(sizes.values())
    assert c["cache_hits"] >= 5 and c["cache_corrupt"] == 0 and c["cache_streamed"] == 0
    assert sorted(_cached(cache).values()) == sorted(sizes.values())
    # a new stream (a new run, another rank of the node) starts warm
    s2 = ShardStream(url, storage_options=opts, cache_dir=str(cache), **KW)
    before = proxy.served("GET", "data/train/shard-")
    assert [(x.key, x.image) for x in s2] == plain[0][0]
    assert proxy.served("GET", "data/train/shard-") == before


def _lru_fetched_bytes(opens: list[int], sizes: list[int], limit: int) -> tuple[int, int]:
    """Bytes and shards a least-recently-used cache of `limit` bytes fetches for `opens`
    (shard indices in the order they are opened): the reference model."""
    held: collections.OrderedDict[int, int] = collections.OrderedDict()
    fetched = n = 0
    for s in opens:
        if s in held:
            held.move_to_end(s)
            continue
        n += 1
        fetched += sizes[s]
        if sizes[s] > limit:
            continue
        while sum(held.values()) + sizes[s] > limit:
            held.popitem(last=False)
        held[s] = sizes[s]
    return fetched, n


def test_a_half_cache_evicts_the_least_recently_used_and_stays_under_its_limit(
        remote, proxy, tmp_path) -> None:
    """One reader lane (opens in plan order): what epochs 1-3 fetch equals an LRU model's."""
    url, ss = remote
    sizes = [Path(u).stat().st_size for u in ss.urls]
    limit = sum(sizes) // 2
    kw = {**KW, "num_workers": 1}
    s = ShardStream(url, storage_options=s3_options(proxy.endpoint), cache_dir=str(tmp_path / "c"),
                    cache_limit=limit, **kw)
    ref = ShardStream(str(ss.root), **kw)
    opens: list[int] = []
    for e in range(3):
        before = proxy.served("GET", "data/train/shard-")
        s.set_epoch(e)
        ref.set_epoch(e)
        assert [x.key for x in s] == [x.key for x in ref]
        got = proxy.served("GET", "data/train/shard-")
        prior = _lru_fetched_bytes(opens, sizes, limit)
        # label_key=auto first reads the start of the first listed shard (once)
        opens += ([0] if e == 0 else []) + [seg.shard for seg in s.segments(e)]
        want = _lru_fetched_bytes(opens, sizes, limit)
        assert (got[1] - before[1], got[0] - before[0]) == (want[0] - prior[0], want[1] - prior[1])
        assert sum(_cached(tmp_path / "c").values()) <= limit
    assert s.counters["cache_evicted"] > 0


def test_corrupt_and_truncated_cache_files_are_dropped_fetched_again_and_counted(
        remote, proxy, tmp_path, caplog) -> None:
    url, ss = remote
    opts = s3_options(proxy.endpoint)
    cache = tmp_path / "cache"
    s = ShardStream(url, storage_options=opts, cache_dir=str(cache), **KW)
    ref = _epochs(ShardStream(str(ss.root), **KW), range(2))
    assert [x.key for x in s] == [k for k, _ in ref[0][0]]
    by_url = {json.loads(m.read_text())["url"]: cache / "objects" / m.stem
              for m in (cache / "objects").glob("*.json")}
    flipped, cut = by_url[f"{url}/shard-000002.tar"], by_url[f"{url}/shard-000004.tar"]
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte changed
    flipped.write_bytes(bytes(data))
    cut.write_bytes(cut.read_bytes()[:1000])
    caplog.set_level(logging.WARNING, logger="sslstream.pipelines.shards.cache")
    proxy.log.clear()
    s.set_epoch(1)
    assert [(x.key, x.image) for x in s] == ref[1][0]  # nothing of the damage reaches a sample
    assert s.counters["cache_corrupt"] == 2
    refetched = sorted(x.path for x in proxy.log if x.method == "GET")
    assert refetched == ["data/train/shard-000002.tar", "data/train/shard-000004.tar"]
    assert "shard-000002.tar is corrupt or truncated" in caplog.text
    assert "shard-000004.tar is corrupt or truncated" in caplog.text
    assert _cached(cache)[f"{url}/shard-000002.tar"] == Path(ss.urls[2]).stat().st_size


def test_local_shards_are_never_copied(remote, s3: S3Env, tmp_path, shard_factory) -> None:
    url, _ = remote
    local = shard_factory([4, 6])
    cache = tmp_path / "cache"
    only_local = ShardStream(local.urls, cache_dir=str(cache))
    assert only_local.cache is None and len(list(only_local)) == 10 and not cache.exists()
    mixed = ShardStream([*local.urls, f"{url}/shard-000001.tar"], cache_dir=str(cache),
                        storage_options=s3.storage_options)
    assert len(list(mixed)) == 15
    assert list(_cached(cache)) == [f"{url}/shard-000001.tar"]


def test_a_mid_epoch_resume_reads_its_state_from_the_cache(remote, proxy, tmp_path) -> None:
    url, ss = remote
    opts = s3_options(proxy.endpoint)
    kw = {**KW, "cache_dir": str(tmp_path / "cache"), "storage_options": opts}
    whole = ShardStream(url, **kw)
    _epochs(whole, range(1))  # fills the cache
    whole.set_epoch(1)
    full = [x.key for x in whole]
    s = ShardStream(url, **kw)
    s.set_epoch(1)
    it = iter(s)
    head = [next(it).key for _ in range(23)]
    state = s.state_dict()
    before = proxy.served("GET", "data/train/shard-")
    resumed = ShardStream(url, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(1)
    assert head + [x.key for x in resumed] == full
    assert resumed.counters["fast_forwarded"] == 23 and resumed.counters["cache_hits"] > 0
    assert proxy.served("GET", "data/train/shard-") == before
    plain = ShardStream(url, **{**kw, "cache_dir": None})  # the cursor does not need the cache
    plain.load_state_dict(state)
    plain.set_epoch(1)
    assert head + [x.key for x in plain] == full


def _race(cache_dir: str, url: str, opts: dict, barrier) -> tuple[str, dict]:
    """In a spawned process: wait for the other one, then open `url` through the cache."""
    counts: collections.Counter = collections.Counter()
    cache = ShardCache(cache_dir, storage_options=opts)
    barrier.wait()
    with cache.open(url, count=lambda k, n=1: counts.update({k: n})) as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return digest, dict(counts)


@pytest.mark.timeout(180)
def test_two_processes_racing_for_one_shard_download_it_once(remote, s3: S3Env, tmp_path) -> None:
    """The store answers slowly (0.5 s per GET), so the second process asks while the first
    is downloading: it waits for it and reads its file; the server sees one GET."""
    url, ss = remote
    slow = FaultProxy(s3.endpoint, delay_s=0.5)
    try:
        ctx = mp.get_context("spawn")
        barrier = ctx.Manager().Barrier(2)
        shard = f"{url}/shard-000002.tar"
        with ctx.Pool(2) as pool:
            jobs = [pool.apply_async(_race, (str(tmp_path / "cache"), shard,
                                             s3_options(slow.endpoint), barrier))
                    for _ in range(2)]
            results = [j.get(timeout=120) for j in jobs]
        want = hashlib.sha256(Path(ss.urls[2]).read_bytes()).hexdigest()
        assert [d for d, _ in results] == [want, want]
        gets = [x for x in slow.log if x.method == "GET" and x.path.endswith("shard-000002.tar")]
        assert len(gets) == 1 and gets[0].body_bytes == Path(ss.urls[2]).stat().st_size
        counts = sorted((c for _, c in results), key=lambda c: c.get("cache_fetched", 0))
        assert counts[0].get("cache_waited") == 1 and counts[0].get("cache_hits") == 1
        assert counts[1].get("cache_fetched") == 1 and not counts[1].get("cache_hits")
    finally:
        slow.close()


def test_a_shard_without_a_manifest_checksum_is_refreshed_when_the_store_changes_it(
        s3: S3Env, proxy, tmp_path, shard_factory) -> None:
    """No sha256 to check against: the cache compares the store's ETag (one HEAD, no body)
    and fetches a rewritten object again."""
    one = shard_factory([6], manifest=False)
    other = shard_factory([6], manifest=False, prefix="other")
    s3.bucket("data")
    s3.fs().put_file(one.urls[0], "data/train/shard-000000.tar")
    shard = "s3://data/train/shard-000000.tar"
    cache = ShardCache(tmp_path / "cache", storage_options=s3_options(proxy.endpoint),
                       expected={shard: Expected()})
    counts: collections.Counter = collections.Counter()

    def read() -> bytes:
        with cache.open(shard, count=lambda k, n=1: counts.update({k: n})) as f:
            return f.read()

    assert read() == Path(one.urls[0]).read_bytes()
    before = proxy.served("GET")
    assert read() == Path(one.urls[0]).read_bytes()
    assert proxy.served("GET") == before and counts["cache_hits"] == 1
    s3.fs().put_file(other.urls[0], "data/train/shard-000000.tar")  # rewritten in place
    assert read() == Path(other.urls[0]).read_bytes()
    assert counts["cache_fetched"] == 2 and counts["cache_corrupt"] == 0


# ---------------------------------------------------------------------------- bad folders

_CHILD = r"""
import json, logging, sys
from sslstream.pipelines.shards.stream import ShardStream

said = []

class Keep(logging.Handler):
    def emit(self, record):
        said.append(record.getMessage())

logging.getLogger("sslstream").addHandler(Keep(logging.WARNING))
url, cache_dir, opts = json.loads(sys.argv[1])
s = ShardStream(url, storage_options=opts, cache_dir=cache_dir, num_workers=2, seed=3,
                shuffle_buffer=8, exact_epoch=True)
keys = []
for e in range(2):
    s.set_epoch(e)
    keys.append([x.key for x in s])
print(json.dumps({"keys": keys, "counters": s.counters, "warnings": said}))
"""


def _mount_ns_works() -> bool:
    import subprocess

    try:
        return subprocess.run(["unshare", "-r", "-m", "true"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def _child(url: str, cache_dir: Path, opts: dict, mount: str | None) -> dict:
    """Two epochs of the stream in a new process; `mount`: a shell command run first in a
    private mount namespace (unshare), e.g. a tiny or read-only tmpfs on the cache folder."""
    import subprocess
    import sys

    args = [sys.executable, "-c", _CHILD, json.dumps([url, str(cache_dir), opts])]
    if mount:
        args = ["unshare", "-r", "-m", "sh", "-c", f'{mount} && exec "$0" "$@"', *args]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _reference_keys(ss: ShardSet) -> list[list[str]]:
    return [[k for k, _ in keys] for keys, _ in _epochs(ShardStream(str(ss.root), **KW), range(2))]


def test_a_read_only_cache_folder_streams_with_one_warning(remote, s3: S3Env, tmp_path) -> None:
    url, ss = remote
    cache = tmp_path / "cache"
    cache.mkdir()
    import os

    if os.geteuid() != 0:  # permissions hold for this user
        cache.chmod(0o555)
        mount = None
    elif _mount_ns_works():  # root ignores permissions: a read-only mount
        mount = f"mount -t tmpfs -o ro,size=1m tmpfs {cache}"
    else:
        pytest.skip("running as root without mount namespaces: no read-only folder to test")
    try:
        out = _child(url, cache, s3.storage_options, mount)
    finally:
        cache.chmod(0o755)
    assert out["keys"] == _reference_keys(ss)  # nothing lost
    said = [w for w in out["warnings"] if "cannot be used" in w]
    assert len(said) == 1 and f"data.cache_dir={cache}" in said[0], out["warnings"]
    c = out["counters"]
    assert c["cache_streamed"] >= 10 and c["cache_fetched"] == 0 and c["cache_hits"] == 0
    assert not any(cache.iterdir())


def test_a_full_disk_streams_with_one_warning(remote, s3: S3Env, tmp_path) -> None:
    """A 64 KiB tmpfs: room for the first shard (50 KiB) and its record, not for a second."""
    if not _mount_ns_works():
        pytest.skip("no mount namespaces (unshare -r -m) for a tiny tmpfs")
    url, ss = remote
    cache = tmp_path / "cache"
    cache.mkdir()
    out = _child(url, cache, s3.storage_options, f"mount -t tmpfs -o size=64k tmpfs {cache}")
    assert out["keys"] == _reference_keys(ss)  # nothing lost
    said = [w for w in out["warnings"] if "cannot be used" in w]
    assert len(said) == 1 and "ENOSPC" in said[0], out["warnings"]
    c = out["counters"]
    assert c["cache_fetched"] == 1 and c["cache_streamed"] >= 9


# ---------------------------------------------------------------------------- processes


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_reader_and_lane_processes_read_through_the_cache(remote, proxy, tmp_path) -> None:
    """The loader with a reader process and a lane process: the same batches as with no
    processes and no cache; epoch 2 asks the store for nothing; the counters of the cache
    (counted in the lane processes) reach the loader's, which the trainer logs as data/*."""
    from sslstream.orchestration.schema import augment_recipe
    from sslstream.pipelines.views.loader import TwoViewLoader

    url, ss = remote
    kw = {"num_workers": 2, "seed": 2, "shuffle_buffer": 8}
    out = {}
    for workers, cache in ((0, None), (2, str(tmp_path / "cache"))):
        stream = ShardStream(url, storage_options=s3_options(proxy.endpoint), cache_dir=cache, **kw)
        with TwoViewLoader(stream, augment_recipe("byol_cifar"), batch_size=5, device="cpu",
                           backend="torchvision", seed=4, workers=workers) as loader:
            keys, served = [], []
            for epoch in range(2):
                before = proxy.served("GET", "data/train/shard-")
                loader.set_epoch(epoch)
                keys += [b.keys for b in loader]
                after = proxy.served("GET", "data/train/shard-")
                served.append(after[0] - before[0])
            out[workers] = (keys, served, loader.counters)
    assert out[2][0] == out[0][0]
    assert out[0][1][1] >= 5 and out[2][1] == [5, 0]
    c = out[2][2]
    assert c["cache_fetched"] == 5 and c["cache_hits"] >= 5 and c["cache_streamed"] == 0


def test_a_rewritten_shard_is_refreshed_and_bytes_unlike_the_manifest_are_not_kept(
        s3: S3Env, tmp_path, shard_factory) -> None:
    """A manifest that now describes other bytes refreshes the entry (not counted corrupt);
    store bytes that match no manifest entry are read but never kept."""
    one, other = shard_factory([6]), shard_factory([9], prefix="other")
    a, b = Path(one.urls[0]).read_bytes(), Path(other.urls[0]).read_bytes()
    s3.bucket("data")
    s3.fs().pipe("data/train/shard-000000.tar", a)
    shard = "s3://data/train/shard-000000.tar"
    counts: collections.Counter = collections.Counter()

    def read(expected: Expected) -> bytes:
        cache = ShardCache(tmp_path / "cache", storage_options=s3.storage_options,
                           expected={shard: expected})
        with cache.open(shard, count=lambda k, n=1: counts.update({k: n})) as f:
            return f.read()

    digest = hashlib.sha256
    assert read(Expected(len(a), digest(a).hexdigest())) == a
    s3.fs().pipe("data/train/shard-000000.tar", b)  # rewritten, and re-indexed:
    assert read(Expected(len(b), digest(b).hexdigest())) == b
    assert counts["cache_fetched"] == 2 and counts["cache_corrupt"] == 0
    # the manifest says `a`, the store holds `b`: read as it is, not cached
    assert read(Expected(len(b), digest(a).hexdigest())) == b
    assert counts["cache_streamed"] == 1 and not _cached(tmp_path / "cache")
