"""`sslstream embed` end to end: a real SIGKILL mid-run and a rerun, two gloo ranks under
torchrun resuming a one-rank output, object stores (moto S3, the GCS fake) on both sides,
CIFAR-10 shards and the embedded default's data. Each input key must be in the output
exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sslstream.orchestration.embed import exits as X
from sslstream.orchestration.embed.job import EmbedRequest, embed
from sslstream.orchestration.embed.manifest import NAME
from sslstream.orchestration.schema import compose_config

from tests.fixtures.gcs import GCS_OPTIONS, FakeGCS
from tests.fixtures.s3 import CREDS, S3Env
from tests.fixtures.shards import write_shard_set
from tests.orchestration.test_embed import checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MLFLOW_TRACKING_URI", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return env


def _keys(out: Path) -> Counter[str]:
    return Counter(pq.read_table(out).column("key").to_pylist())


def test_sigkill_and_sigterm_mid_run_then_rerun_gives_each_key_once(tmp_path: Path) -> None:
    # ResNet-18 on 12 one-shard parts: slow enough on one thread to be killed mid-run
    ss = write_shard_set(tmp_path / "shards", [16] * 12, image_size=32)
    checkpoint(tmp_path / "ckpt.pt", overrides=("backbone=resnet18_cifar",))
    out = tmp_path / "emb"
    argv = [sys.executable, "-m", "sslstream", "embed", "--model", str(tmp_path / "ckpt.pt"),
            "--out", str(out), f"embed.source={ss.root}", "backbone=resnet18_cifar",
            "embed.shards_per_part=1", "embed.batch_size=8", "embed.num_threads=1",
            "embed.loader_threads=1", "data.num_workers=1"]
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while len(list(out.glob("part-*.parquet"))) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no part written in 240 s"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 2 <= len(first) < 12, f"the run was not killed mid-way: {sorted(first)}"
    assert json.loads((out / NAME).read_text())["status"] == "running"
    # whatever the kill interrupted, every part there is whole: they all read
    assert sum(pq.read_metadata(out / n).num_rows for n in first) == 16 * len(first)

    # a second run stopped by SIGTERM (a preemption): exit 8, what it wrote is kept
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    while len(list(out.glob("part-*.parquet"))) < len(first) + 1:
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline + 240, "the second run wrote no part"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    said = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == X.EXIT_PREEMPTED, said[-3000:]
    assert "stopped by SIGTERM" in said and "rerun the same command to resume" in said
    second = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert {n: second[n] for n in first} == first and len(second) < 12

    rerun = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert rerun.returncode == X.EXIT_OK, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"{12 - len(second)} to embed, {len(second)} already there" in rerun.stderr
    first = second
    keys = _keys(out)
    assert set(keys) == ss.good_keys and max(keys.values()) == 1
    assert {n: (out / n).stat().st_mtime_ns for n in first} == first  # kept, not redone
    assert not list(out.glob(".tmp-*"))
    manifest = json.loads((out / NAME).read_text())
    assert manifest["status"] == "complete" and manifest["rows"] == 192


def test_two_ranks_under_torchrun_resume_a_one_rank_output(tmp_path: Path) -> None:
    ss = write_shard_set(tmp_path / "shards", [9, 14, 3, 11, 8, 10, 12, 5], image_size=32)
    checkpoint(tmp_path / "ckpt.pt")
    out = tmp_path / "emb"
    args = ["embed", "--model", str(tmp_path / "ckpt.pt"), "--out", str(out),
            f"embed.source={ss.root}", "embed.shards_per_part=1", "embed.batch_size=4",
            "data.num_workers=1"]
    one = subprocess.run([sys.executable, "-m", "sslstream", *args], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=200)
    assert one.returncode == 0, one.stderr[-3000:]
    # as if the one-rank run had died before parts 1, 5 and 6: one of rank 0's share of two
    # ranks (parts 0-3), two of rank 1's (parts 4-7)
    for n in (1, 5, 6):
        (out / f"part-{n:06d}.parquet").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc-per-node=2", "-m", "sslstream.orchestration.cli", *args]
    two = subprocess.run(argv, cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    assert "3 to embed, 5 already there), 2 rank(s)" in two.stderr
    keys = _keys(out)
    assert set(keys) == ss.good_keys and max(keys.values()) == 1 and sum(keys.values()) == 72
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    manifest = json.loads((out / NAME).read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    assert [p["rows"] for p in manifest["parts"]] == [9, 14, 3, 11, 8, 10, 12, 5]


def test_s3_to_s3(s3: S3Env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  caplog: pytest.LogCaptureFixture) -> None:
    ss = write_shard_set(tmp_path / "shards", [7, 12, 5], image_size=32)
    s3.bucket("data")
    s3.bucket("emb")
    src = s3.upload(ss.root, "data/train")
    checkpoint(tmp_path / "ckpt.pt")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint)
    cfg = compose_config([f"embed.source={src}", "embed.shards_per_part=2", "data.num_workers=2",
                          "embed.batch_size=8"])
    res = embed(cfg, EmbedRequest(str(tmp_path / "ckpt.pt"), "s3://emb/run1"))
    fs = s3.fs()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls("emb/run1")) == [
        NAME, "part-000000.parquet", "part-000001.parquet"]
    table = pq.read_table("emb/run1", filesystem=fs)
    assert Counter(table.column("key").to_pylist()) == Counter(ss.good_keys)
    assert table.column("shard").to_pylist()[0] == "s3://data/train/shard-000000.tar"
    assert res.manifest.rows == 24
    # refused credentials and a missing bucket: exit 4 naming the URL, before embedding
    from sslstream.orchestration.cli import main

    assert main(["embed", "--model", str(tmp_path / "ckpt.pt"), "--out", "s3://no-such/e",
                 f"embed.source={src}"]) == X.EXIT_SOURCE
    assert "--out s3://no-such/e" in caplog.text
    caplog.clear()  # credentials written into the URL are masked wherever they show up
    assert main(["embed", "--model", str(tmp_path / "ckpt.pt"), "--out",
                 "s3://user:hunter2@emb/run2", f"embed.source={src}"]) == X.EXIT_SOURCE
    assert "--out s3://***@emb/run2" in caplog.text and "hunter2" not in caplog.text
    s3.set_auth(True)  # moto now refuses the environment's keys
    caplog.clear()
    assert main(["embed", "--model", str(tmp_path / "ckpt.pt"), "--out", "s3://emb/run2",
                 f"embed.source={src}"]) == X.EXIT_SOURCE
    assert "--out s3://emb/run2" in caplog.text and "access refused" in caplog.text
    assert CREDS["AWS_SECRET_ACCESS_KEY"] not in caplog.text


def test_gcs_to_gcs(gcs: FakeGCS, tmp_path: Path) -> None:
    ss = write_shard_set(tmp_path / "shards", [6, 9], image_size=32)
    for p in sorted(ss.root.iterdir()):
        gcs.put("data", f"train/{p.name}", p.read_bytes())
    gcs.buckets.add("out")
    checkpoint(tmp_path / "ckpt.pt")
    opts = [f"+data.storage_options.{k}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in GCS_OPTIONS.items()]
    cfg = compose_config(["embed.source=gs://data/train", "embed.shards_per_part=1", *opts,
                          "embed.batch_size=4"])
    embed(cfg, EmbedRequest(str(tmp_path / "ckpt.pt"), "gs://out/emb"))
    names = sorted(n for (b, n) in gcs.objects if b == "out")
    assert names == ["emb/_manifest.json", "emb/part-000000.parquet", "emb/part-000001.parquet"]
    import io

    rows = [pq.read_table(io.BytesIO(gcs.objects[("out", n)])) for n in names[1:]]
    keys = Counter(k for t in rows for k in t.column("key").to_pylist())
    assert keys == Counter(ss.good_keys)
    manifest = json.loads(gcs.objects[("out", "emb/_manifest.json")])
    assert manifest["status"] == "complete" and manifest["rows"] == 15


def test_cifar10_test_shard(cifar10_dir: Path, tmp_path: Path) -> None:
    small = ("backbone.widths=[4,8,8,8]",)
    checkpoint(tmp_path / "ckpt.pt", overrides=small)
    cfg = compose_config(["data=cifar10", f"data.root={cifar10_dir}", "backbone=resnet_mini", *small,
                          f"embed.source={cifar10_dir}/test-000001.tar.gz",
                          "embed.batch_size=500"])
    res = embed(cfg, EmbedRequest(str(tmp_path / "ckpt.pt"), str(tmp_path / "emb")))
    table = pq.read_table(tmp_path / "emb")
    assert table.num_rows == res.manifest.rows == 5000
    assert len(set(table.column("key").to_pylist())) == 5000
    labels = Counter(table.column("label").to_pylist())
    assert sorted(labels) == list(range(10)) and min(labels.values()) > 300
    assert table.schema.field("embedding").type.list_size == 8


def test_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No source given: data.train of the embedded default, generated on first use."""
    monkeypatch.chdir(tmp_path)
    checkpoint(tmp_path / "ckpt.pt")
    from sslstream.orchestration.cli import main

    assert main(["embed", "--model", "ckpt.pt", "--out", "emb",
                 "data.generate_train_samples=96", "data.generate_test_samples=32"]) == 0
    manifest = json.loads((tmp_path / "emb" / NAME).read_text())
    assert manifest["rows"] == 96 and manifest["input"]["source"] == "./data/synthetic/train"
