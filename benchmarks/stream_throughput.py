"""Samples/s that ShardStream delivers from local shards and from an S3-compatible server.

    python benchmarks/stream_throughput.py                       # synthetic shards, local + moto
    python benchmarks/stream_throughput.py --source ../shared/data/cifar10#train --no-s3
    python benchmarks/stream_throughput.py --s3-endpoint http://127.0.0.1:9000 --bucket b

Measures the stream alone (read, untar, header check, shuffle buffer): no decode, no
augmentation. Without --s3-endpoint a moto server is started in this process; it then
shares the GIL with the reader threads, so its numbers are a floor, not what a real
object store gives. Results go to stdout as a table (and JSON with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sslstream.pipelines.shards.stream import ShardStream  # noqa: E402
from sslstream.pipelines.shards.tools import write_shards  # noqa: E402


def synthetic_samples(n: int, size: int, seed: int = 0):
    """Smooth random-gradient JPEGs (closer to photo sizes than pure noise)."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        a = rng.uniform(0, 255, (3, 3))
        img = np.stack([a[c, 0] * xx + a[c, 1] * yy + a[c, 2] * xx * yy for c in range(3)], -1)
        img = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
        out = io.BytesIO()
        Image.fromarray(img).save(out, format="JPEG", quality=90)
        yield f"s{i:07d}", out.getvalue(), i % 10


def measure(urls: str, storage_options: dict | None, workers: int, epochs: int = 1) -> dict:
    s = ShardStream(urls, num_workers=workers, storage_options=storage_options, shuffle_buffer=1000,
                    exact_epoch=True)
    n = nbytes = 0
    t0 = time.perf_counter()
    for e in range(epochs):
        s.set_epoch(e)
        for x in s:
            n += 1
            nbytes += len(x.image)
    dt = time.perf_counter() - t0
    return {"workers": workers, "samples": n, "seconds": round(dt, 2),
            "samples_per_s": round(n / dt), "image_MB_per_s": round(nbytes / dt / 1e6, 1),
            "retries": s.counters["retries"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", help="existing shards (folder, manifest, pattern); default: synthetic")
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--gzip", action="store_true")
    p.add_argument("--workers", default="1,2,4", help="comma-separated reader thread counts")
    p.add_argument("--no-s3", action="store_true")
    p.add_argument("--s3-endpoint", help="use this server instead of an in-process moto")
    p.add_argument("--bucket", default="bench")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="sslstream-bench-"))
    rows = []
    try:
        src = a.source
        if src is None:
            t = time.perf_counter()
            man = write_shards(synthetic_samples(a.samples, a.image_size), tmp / "shards",
                               max_count=a.shard_size, compress=a.gzip)
            src = str(tmp / "shards")
            print(f"wrote {man.num_samples} samples in {len(man.shards)} shards "
                  f"({sum(e.bytes for e in man.shards) / 1e6:.1f} MB) in {time.perf_counter() - t:.1f} s")
        for w in workers:
            rows.append({"store": "local", **measure(src, None, w)})
            print(rows[-1], flush=True)
        if not a.no_s3:
            if a.source is not None and not Path(a.source.partition("#")[0]).is_dir():
                raise SystemExit("--source must be a local folder to upload to S3 (or use --no-s3)")
            server = None
            endpoint = a.s3_endpoint
            if endpoint is None:
                from moto.server import ThreadedMotoServer

                os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
                os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
                os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
                server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
                server.start()
                host, port = server.get_host_and_port()
                endpoint = f"http://{host}:{port}"
            import s3fs

            so = {"client_kwargs": {"endpoint_url": endpoint}}
            fs = s3fs.S3FileSystem(**so)
            if not fs.exists(a.bucket):
                fs.mkdir(a.bucket)
            local = Path(src.partition("#")[0])
            for f in sorted(local.iterdir()):
                if f.is_file():
                    fs.put_file(str(f), f"{a.bucket}/data/{f.name}")
            frag = "#" + src.partition("#")[2] if "#" in src else ""
            for w in workers:
                rows.append({"store": "s3 (moto)" if server else f"s3 ({endpoint})",
                             **measure(f"s3://{a.bucket}/data{frag}", so, w)})
                print(rows[-1], flush=True)
            if server is not None:
                server.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print("\n| store | reader threads | samples | s | samples/s | image MB/s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['store']} | {r['workers']} | {r['samples']} | {r['seconds']} | "
              f"{r['samples_per_s']} | {r['image_MB_per_s']} |")
    if a.json:
        print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
