"""The data plane on gs:// through gcsfs, against a GCS JSON-API server on 127.0.0.1
(tests/fixtures/gcs.py): listing, manifests, brace patterns, rank splits, missing objects,
refused access and transient server errors, and webdataset through our opener."""

from __future__ import annotations

import json

import pytest
from sslstream.pipelines.shards.storage import (
    AccessDenied,
    ShardNotFound,
    classify,
    register_webdataset_gopen,
)
from sslstream.pipelines.shards.stream import ShardStream

from tests.fixtures.gcs import GCS_OPTIONS, FakeGCS

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def gcs_shards(gcs: FakeGCS, uneven_shards):
    for p in sorted(uneven_shards.root.iterdir()):
        if p.is_file():
            gcs.put("data", f"train/{p.name}", p.read_bytes())
    return "gs://data/train", uneven_shards


def test_stream_from_gcs_matches_local(gcs: FakeGCS, gcs_shards) -> None:
    url, ss = gcs_shards
    kw = {"rank": 1, "world_size": 2, "num_workers": 2, "seed": 7, "exact_epoch": True,
          "shuffle_buffer": 8}
    remote = ShardStream(url, storage_options=GCS_OPTIONS, **kw)
    local = ShardStream(str(ss.root), **kw)
    got = [(x.key, x.image, x.label) for x in remote]
    assert got == [(x.key, x.image, x.label) for x in local]
    assert len(got) == len(remote) == 31
    assert remote.shard_urls[0] == "gs://data/train/shard-000000.tar"
    assert any(r.startswith("GET /download/storage/v1/b/data/o/train%2Fshard-") for r in gcs.requests)


def test_brace_pattern_and_manifest_url_on_gcs(gcs: FakeGCS, gcs_shards) -> None:
    _, ss = gcs_shards
    pat = ShardStream("gs://data/train/shard-{000000..000004}.tar", storage_options=GCS_OPTIONS)
    assert pat.shard_counts == [17, 5, 23, 9, 7]
    man = ShardStream("gs://data/train/manifest.json", storage_options=GCS_OPTIONS)
    assert sorted(x.key for x in man) == sorted(ss.good_keys)


def test_missing_object_on_gcs_names_the_url(gcs: FakeGCS, gcs_shards) -> None:
    url, _ = gcs_shards
    del gcs.objects[("data", "train/shard-000002.tar")]
    with pytest.raises(ShardNotFound, match="gs://data/train/shard-000002.tar does not exist"):
        list(ShardStream(url, storage_options=GCS_OPTIONS, num_workers=2))  # the folder's manifest lists it: found before reading


def test_forbidden_on_gcs_is_access_denied_naming_the_url(gcs: FakeGCS, gcs_shards) -> None:
    url, _ = gcs_shards
    gcs.fail = [403]  # the first download is the manifest's
    with pytest.raises(AccessDenied, match="access denied for gs://data/train/manifest.json"):
        ShardStream(url, storage_options=GCS_OPTIONS)


def test_transient_gcs_errors_complete_with_nothing_lost(gcs: FakeGCS, gcs_shards) -> None:
    url, ss = gcs_shards
    kw = {"num_workers": 1, "seed": 1, "shuffle_buffer": 8}
    ref = [(x.key, x.image) for x in ShardStream(str(ss.root), **kw)]
    s = ShardStream(url, storage_options=GCS_OPTIONS, **kw)
    gcs.fail = [503, 429]  # the next two shard downloads
    assert [(x.key, x.image) for x in s] == ref
    assert gcs.fail == []  # both were served
    assert s.counters["skipped_corrupt"] == 0 and s.counters["lost"] == 0


def test_webdataset_reads_gcs_through_the_registered_opener(gcs: FakeGCS, gcs_shards) -> None:
    import webdataset as wds

    _, ss = gcs_shards
    register_webdataset_gopen(GCS_OPTIONS)
    ds = wds.WebDataset("gs://data/train/shard-{000000..000001}.tar", shardshuffle=False,
                        empty_check=False)
    assert [s["__key__"] for s in ds] == ss.keys[0] + ss.keys[1]


def test_gcsfs_errors_are_classified_like_their_s3_counterparts() -> None:
    """What gcsfs raises once its own retries are spent: HttpError carries the HTTP status
    (5xx, 408, 429: transient, so the stream retries; 401: denied), a 403 is a bare
    OSError("Forbidden: ..."), a 404 a FileNotFoundError, a 502 requests' ProxyError."""
    gcsfs_retry = pytest.importorskip("gcsfs.retry")
    import requests

    def http(code: int) -> Exception:
        return gcsfs_retry.HttpError({"code": code, "message": "x"})

    assert [classify(http(c)) for c in (500, 503, 408, 429)] == ["transient"] * 4
    assert classify(http(401)) == "denied"
    assert classify(http(400)) == "fatal"
    assert classify(OSError("Forbidden: b/data/o/x\nno access")) == "denied"
    assert classify(FileNotFoundError("b/data/o/x")) == "not_found"
    assert classify(requests.exceptions.ProxyError()) == "transient"
    assert classify(OSError("some other failure")) == "fatal"


def test_retrain_snapshot_of_a_gcs_prefix_sees_new_and_rewritten_shards(gcs: FakeGCS,
                                                                         gcs_shards) -> None:
    """Without a manifest the retraining job fingerprints gs:// objects by GCS's md5Hash:
    the id holds still when nothing changed and moves when a shard is added or rewritten."""
    from sslstream.pipelines.shards.snapshot import take_snapshot

    url, ss = gcs_shards
    del gcs.objects[("data", "train/manifest.json")]
    first = take_snapshot(url, dict(GCS_OPTIONS))
    assert sorted(first.fingerprints()) == [f"shard-00000{i}.tar" for i in range(5)]
    assert all(f.startswith("md5:") for f in first.fingerprints().values())
    assert take_snapshot(url, dict(GCS_OPTIONS)).id == first.id
    gcs.put("data", "train/shard-000005.tar", (ss.root / "shard-000000.tar").read_bytes())
    added = take_snapshot(url, dict(GCS_OPTIONS))
    assert added.id != first.id and len(added.fingerprints()) == 6
    gcs.put("data", "train/shard-000001.tar", (ss.root / "shard-000002.tar").read_bytes())
    rewritten = take_snapshot(url, dict(GCS_OPTIONS))
    assert rewritten.id != added.id
    assert rewritten.fingerprints()["shard-000001.tar"] == added.fingerprints()["shard-000002.tar"]


def test_write_and_verify_on_gcs(gcs: FakeGCS) -> None:
    """`sslstream shards make` / `verify` on gs://: gcsfs's multipart uploads, then the
    manifest's sha256 against what the store serves, and a tampered shard named."""
    from sslstream.pipelines.shards.tools import verify, write_shards

    from tests.fixtures.shards import make_jpeg

    gcs.buckets.add("out")
    man = write_shards([(f"k{i}", make_jpeg(i), i % 2) for i in range(9)], "gs://out/set",
                       max_count=4, compress=True, classes=["a", "b"],
                       storage_options=dict(GCS_OPTIONS))
    assert [e.samples for e in man.shards] == [4, 4, 1]
    assert sorted(n for b, n in gcs.objects if b == "out") == [
        "set/manifest.json", "set/shard-000000.tar.gz", "set/shard-000001.tar.gz",
        "set/shard-000002.tar.gz"]
    rep = verify("gs://out/set", dict(GCS_OPTIONS))
    assert rep.ok and [c.samples for c in rep.shards] == [4, 4, 1]
    gcs.put("out", "set/shard-000001.tar.gz", b"\x1f\x8b" + b"\x00" * 64)  # tampered
    assert verify("gs://out/set/manifest.json", dict(GCS_OPTIONS)).bad[0].shard == \
        "shard-000001.tar.gz"
    stream = ShardStream("gs://out/set", storage_options=dict(GCS_OPTIONS), max_bad_fraction=1.0)
    keys = [x.key for x in stream]
    assert len(keys) == 9 and set(keys) == {"k0", "k1", "k2", "k3", "k8"}  # topped up
    assert stream.counters["lost"] == 4 and stream.counters["truncated_shards"] == 1


_EMULATOR_PROBE = """
import json, sys, time
t0 = time.monotonic()
from sslstream.pipelines.shards.stream import ShardStream
keys = [s.key for s in ShardStream(sys.argv[1], storage_options={"token": "anon"})]
import fsspec
print("PROBE " + json.dumps({"n": len(keys), "s": time.monotonic() - t0,
                              "fs": fsspec.get_filesystem_class("gs").__module__}))
"""


@pytest.mark.timeout(120)
def test_an_emulator_endpoint_gets_gcsfs_plain_filesystem_by_default(gcs: FakeGCS, gcs_shards,
                                                                      tmp_path) -> None:
    """A fresh process with only STORAGE_EMULATOR_HOST set (as a user of fake-gcs-server
    would have): without our default gcsfs's extended filesystem would spend 60 s per call
    on a gRPC lookup the emulator cannot answer; with it the read takes seconds."""
    import os
    import subprocess
    import sys

    url, ss = gcs_shards
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    env["STORAGE_EMULATOR_HOST"] = gcs.endpoint
    proc = subprocess.run([sys.executable, "-c", _EMULATOR_PROBE, url], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=100)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
    assert line, proc.stderr[-3000:]
    probe = json.loads(line[-1].removeprefix("PROBE "))
    assert probe["n"] == len(ss.good_keys) and probe["fs"] == "gcsfs.core"
    assert probe["s"] < 30, probe
