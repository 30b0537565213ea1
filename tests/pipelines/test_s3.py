"""The data plane against a real S3-compatible server (moto) on 127.0.0.1, via endpoint URL,
and through a proxy that injects 503 SlowDown, cut bodies and connection resets."""

from __future__ import annotations

import pytest
from sslstream.pipelines.shards.masking import mask
from sslstream.pipelines.shards.storage import AccessDenied, ShardNotFound
from sslstream.pipelines.shards.stream import ShardStream
from sslstream.pipelines.shards.tools import main as shards_main
from sslstream.pipelines.shards.tools import verify, write_shards

from tests.fixtures.s3 import CREDS, S3Env, s3_options
from tests.fixtures.shards import make_jpeg

pytestmark = [pytest.mark.s3, pytest.mark.timeout(120)]


@pytest.fixture
def s3_shards(s3: S3Env, uneven_shards):
    s3.bucket("data")
    return s3.upload(uneven_shards.root, "data/train"), uneven_shards


def test_stream_from_s3_matches_local(s3: S3Env, s3_shards) -> None:
    url, ss = s3_shards
    kw = {"rank": 1, "world_size": 2, "num_workers": 2, "seed": 7, "exact_epoch": True, "shuffle_buffer": 8}
    remote = ShardStream(url, storage_options=s3.storage_options, **kw)
    local = ShardStream(str(ss.root), **kw)
    got = [(x.key, x.image, x.label) for x in remote]
    assert got == [(x.key, x.image, x.label) for x in local]
    assert len(got) == len(remote) == 31
    assert remote.shard_urls[0].startswith("s3://data/train/shard-")
    # brace pattern and manifest URL forms on the object store
    pat = ShardStream("s3://data/train/shard-{000000..000004}.tar", storage_options=s3.storage_options)
    assert pat.shard_counts == [17, 5, 23, 9, 7]
    man = ShardStream("s3://data/train/manifest.json", storage_options=s3.storage_options)
    assert sorted(x.key for x in man) == sorted(ss.good_keys)


def test_endpoint_from_environment(s3: S3Env, s3_shards, monkeypatch: pytest.MonkeyPatch) -> None:
    url, ss = s3_shards
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    s = ShardStream(url, storage_options={"skip_instance_cache": True})
    assert sorted(x.key for x in s) == sorted(ss.good_keys)


def test_write_and_verify_on_s3(s3: S3Env) -> None:
    s3.bucket("out")
    man = write_shards([(f"k{i}", make_jpeg(i), i % 2) for i in range(9)], "s3://out/set",
                       max_count=4, compress=True, classes=["a", "b"], storage_options=s3.storage_options)
    assert [e.samples for e in man.shards] == [4, 4, 1]
    rep = verify("s3://out/set", s3.storage_options)
    assert rep.ok and [c.samples for c in rep.shards] == [4, 4, 1]
    fs = s3.fs()
    fs.pipe("out/set/shard-000001.tar.gz", b"\x1f\x8b" + b"\x00" * 64)  # overwrite: tampered
    assert verify("s3://out/set/manifest.json", s3.storage_options).bad[0].shard == "shard-000001.tar.gz"


def test_cli_verify_on_s3_names_the_missing_shard(s3: S3Env, s3_shards, capsys, monkeypatch) -> None:
    url, _ = s3_shards
    s3.fs().rm("data/train/shard-000003.tar")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    assert shards_main(["verify", url]) == 1
    out = capsys.readouterr()
    assert "BAD shard-000003.tar" in out.out and "s3://data/train/shard-000003.tar does not exist" in out.out


def test_missing_shard_on_s3_names_the_url(s3: S3Env, s3_shards) -> None:
    url, _ = s3_shards
    s3.fs().rm("data/train/shard-000002.tar")
    with pytest.raises(ShardNotFound, match="s3://data/train/shard-000002.tar does not exist"):
        list(ShardStream(url, storage_options=s3.storage_options, num_workers=2))  # the folder's manifest lists it: found before reading


def test_refused_credentials_are_a_clear_error_without_secrets(s3: S3Env, s3_shards) -> None:
    url, _ = s3_shards
    s3.set_auth(True)  # moto now accepts only keys made through its IAM: ours are refused
    opts = s3_options(s3.endpoint, key="AKIAWRONGKEY", secret="very-secret-value-123")
    with pytest.raises(AccessDenied) as e:
        ShardStream(url, storage_options=opts)
    msg = str(e.value)
    assert "access denied for s3://data/train/manifest.json" in msg and "credentials" in msg
    assert "very-secret-value-123" not in msg and CREDS["AWS_SECRET_ACCESS_KEY"] not in msg
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert "very-secret-value-123" not in repr(mask(opts, options=True))  # what the stream would log


@pytest.mark.parametrize("faults", [["503"] * 4, ["cut", "cut"], ["reset", "reset"]],
                         ids=["slowdown", "cut-body", "reset"])
def test_transient_faults_complete_with_nothing_lost(s3: S3Env, s3_shards, fault_proxy, faults) -> None:
    url, ss = s3_shards
    kw = {"num_workers": 2, "seed": 1, "shuffle_buffer": 8}
    ref = [(x.key, x.image) for x in ShardStream(str(ss.root), **kw)]
    s = ShardStream(url, storage_options=s3_options(fault_proxy.endpoint), **kw)
    fault_proxy.only = "GET"
    fault_proxy.plan = list(faults)  # the next GETs (shard bodies) fail
    assert [(x.key, x.image) for x in s] == ref
    assert fault_proxy.injected == [f"GET:{f}" for f in faults]
    assert s.counters["skipped_corrupt"] == 0 and s.counters["lost"] == 0


def test_faults_beyond_the_client_retries_are_retried_by_the_stream(
        s3: S3Env, s3_shards, fault_proxy, monkeypatch: pytest.MonkeyPatch) -> None:
    """With s3fs and botocore each allowed one attempt, the stream's own backoff does the work."""
    import s3fs

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    url, ss = s3_shards
    opts = s3_options(fault_proxy.endpoint, config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
    s = ShardStream(url, storage_options=opts, num_workers=1, shuffle=False)
    fault_proxy.plan = ["503", "503", "reset", "cut", "reset"]
    assert [x.key for x in s] == [k for ks in ss.keys for k in ks]
    assert len(fault_proxy.injected) == 5
    # Without the stream's own retries the first failure the client gives up on would end
    # the epoch; some are absorbed by s3fs's HEAD -> LIST fallback, so at least one here.
    assert s.counters["retries"] >= 1


def test_webdataset_reads_s3_through_the_registered_opener(s3: S3Env, s3_shards) -> None:
    """webdataset 1.0.2 has no s3 handler; register_webdataset_gopen gives it ours."""
    import webdataset as wds
    from sslstream.pipelines.shards.storage import register_webdataset_gopen

    url, ss = s3_shards
    register_webdataset_gopen(s3.storage_options)
    ds = wds.WebDataset("s3://data/train/shard-{000000..000001}.tar", shardshuffle=False,
                        empty_check=False)
    keys = [s["__key__"] for s in ds]
    assert keys == ss.keys[0] + ss.keys[1]


def test_a_server_that_keeps_failing_ends_in_bounded_retries_naming_the_url(
        s3: S3Env, s3_shards, fault_proxy, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    """Retries are bounded: a server answering 503 to every GET stops the epoch with an error
    naming the shard URL and the attempt count, after a bounded number of requests, and no
    secret reaches the message or the log."""
    import dataclasses
    import logging

    import s3fs
    from sslstream.pipelines.shards import storage

    monkeypatch.setattr(s3fs.S3FileSystem, "retries", 1)
    fast = dataclasses.replace(storage.RetryPolicy(), base_delay=0.01, max_delay=0.02)
    monkeypatch.setattr(storage, "RetryPolicy", lambda: fast)
    url, _ = s3_shards
    opts = s3_options(fault_proxy.endpoint, config_kwargs={"retries": {"max_attempts": 1, "mode": "standard"}})
    s = ShardStream(url, storage_options=opts, num_workers=1, shuffle=False)
    fault_proxy.only = "GET"
    fault_proxy.plan = ["503"] * 1000
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception) as err:  # noqa: PT011
        list(s)
    msg = str(err.value)
    assert "s3://data/train/shard-" in msg and "gave up after" in msg, msg
    assert 0 < len(fault_proxy.injected) <= 3 * fast.attempts, len(fault_proxy.injected)
    from tests.fixtures.s3 import CREDS

    secret = CREDS["AWS_SECRET_ACCESS_KEY"]
    assert secret not in msg and secret not in caplog.text


def test_a_rewritten_manifest_is_read_whole_after_a_listing_cached_its_old_size(s3: S3Env) -> None:
    """A growing shard set rewrites manifest.json; the process's fsspec instance may hold a
    listing (sizes) from before. The manifest is read at its size now, not the cached one
    (the stale size cut it short: "not valid JSON")."""
    import json

    from sslstream.pipelines.shards.manifest import load_manifest
    from sslstream.pipelines.shards.storage import get_fs

    s3.bucket("grow")
    writer = s3.fs(skip_instance_cache=True)  # another client: the process's cache never sees it
    small = {"shards": [{"shard": "a.tar", "samples": 1}]}
    writer.pipe("grow/set/manifest.json", json.dumps(small).encode())
    so = {"client_kwargs": {"endpoint_url": s3.endpoint}}  # s3fs's defaults: listings cached
    fs, path = get_fs("s3://grow/set", so)
    fs.ls(path, detail=True)  # the listing that caches manifest.json's size
    big = {"shards": [{"shard": f"shard-{i:06d}.tar", "samples": 100} for i in range(50)]}
    writer.pipe("grow/set/manifest.json", json.dumps(big).encode())
    man = load_manifest("s3://grow/set/manifest.json", so)
    assert len(man.shards) == 50
