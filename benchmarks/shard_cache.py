"""What the local shard cache saves: bytes and requests to the store, and epoch time, for
epochs 1 and 2 of one rank's ShardStream with no cache, a full cache and a half cache.

    python benchmarks/shard_cache.py                               # CIFAR-10 train on moto
    python benchmarks/shard_cache.py --rate 10 --delay 0.05        # a slower, farther store
    python benchmarks/shard_cache.py --source DIR#split --limits none,full,half,0.25

The shards are uploaded to a moto S3 server, and the stream reads them through a counting
proxy in front of it (tests/fixtures/s3.py `FaultProxy`): the bytes and requests are what the
server side sent, not what our code believes it asked for. Server and proxy run in a
separate process, so they do not share the reading process's GIL. `--rate` paces each GET
body at that many MB/s (per connection) and `--delay` adds seconds per GET, to stand in for
a store farther away than 127.0.0.1. Every configuration starts from an empty cache folder
and a new stream (the same seed: the same shard order in every configuration). Epoch time
is the stream alone (read, untar, header check, shuffle buffer): no decode, no training.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
         "AWS_DEFAULT_REGION": "us-east-1"}


def _serve(conn, rate: float, delay: float) -> None:
    """The store's process: moto + the counting proxy; answers 'stats', 'clear', 'stop'."""
    import logging

    os.environ.update(CREDS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
    from moto.server import ThreadedMotoServer

    from tests.fixtures.s3 import FaultProxy

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    proxy = FaultProxy(f"http://{host}:{port}", delay_s=delay, rate=rate)
    conn.send((f"http://{host}:{port}", proxy.endpoint))
    while True:
        cmd = conn.recv()
        if cmd == "stats":
            with proxy._lock:
                log = list(proxy.log)
            gets = [s for s in log if s.method == "GET"]
            conn.send({"requests": len(log), "get_requests": len(gets),
                       "get_bytes": sum(s.body_bytes for s in gets)})
        elif cmd == "clear":
            with proxy._lock:
                proxy.log.clear()
            conn.send(True)
        else:
            proxy.close()
            server.stop()
            conn.send(True)
            return


class Store:
    def __init__(self, rate_mb_s: float, delay_s: float) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(child, rate_mb_s * 1e6, delay_s), daemon=True)
        self._proc.start()
        self.moto, self.proxy = self._conn.recv()

    def ask(self, cmd: str):
        self._conn.send(cmd)
        return self._conn.recv()

    def close(self) -> None:
        self.ask("stop")
        self._proc.join(10)


def upload(moto: str, local: Path, bucket: str) -> str:
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto})
    fs.mkdir(bucket)
    for f in sorted(local.iterdir()):
        if f.is_file():
            fs.put_file(str(f), f"{bucket}/set/{f.name}")
    return f"s3://{bucket}/set"


def run(url: str, store: Store, limit: int | None, cache_dir: Path | None, epochs: int,
        workers: int, buffer: int) -> list[dict]:
    from sslstream.pipelines.shards.stream import ShardStream

    opts = {"client_kwargs": {"endpoint_url": store.proxy}, "skip_instance_cache": True}
    store.ask("clear")
    s = ShardStream(url, storage_options=opts, num_workers=workers, shuffle_buffer=buffer,
                    exact_epoch=True, seed=0, cache_dir=str(cache_dir) if cache_dir else None,
                    cache_limit=limit)
    rows = [{"epoch": "setup", **store.ask("stats"), "seconds": None}]
    for e in range(epochs):
        store.ask("clear")
        before = dict(s.counters)
        s.set_epoch(e)
        t0 = time.perf_counter()
        n = sum(1 for _ in s)
        dt = time.perf_counter() - t0
        c = {k: s.counters[k] - before.get(k, 0) for k in
             ("cache_hits", "cache_fetched", "cache_evicted", "cache_streamed")}
        rows.append({"epoch": e + 1, **store.ask("stats"), "seconds": round(dt, 2),
                     "samples": n, **c})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--source", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10#train"),
                   help="a local shard folder (its manifest.json), #split allowed")
    p.add_argument("--limits", default="none,full,half",
                   help="comma-separated: none (no cache), full, half, or a fraction of the set's bytes")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workers", type=int, default=4, help="reader threads (data.num_workers)")
    p.add_argument("--shuffle-buffer", type=int, default=5000)
    p.add_argument("--rate", type=float, default=0.0, help="MB/s per GET body (0: unpaced)")
    p.add_argument("--delay", type=float, default=0.0, help="seconds added to every GET")
    p.add_argument("--repeat", type=int, default=1, help="run every configuration this many times "
                   "(interleaved: none, full, half, none, ...), for the spread of the times")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    os.environ.update(CREDS)
    for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_PROFILE"):
        os.environ.pop(k, None)
    import torch

    torch.set_num_threads(1)
    from sslstream.pipelines.shards.manifest import resolve_shards

    folder, _, split = a.source.partition("#")
    local_refs, _ = resolve_shards(a.source)
    total = sum(Path(r.url).stat().st_size for r in local_refs)
    biggest = max(Path(r.url).stat().st_size for r in local_refs)
    store = Store(a.rate, a.delay)
    tmp = Path(tempfile.mkdtemp(prefix="sslstream-cache-bench-"))
    results = []
    try:
        url = upload(store.moto, Path(folder), "bench") + (f"#{split}" if split else "")
        for name in a.limits.split(",") * a.repeat:
            frac = {"none": None, "full": 1.0, "half": 0.5}.get(name)
            frac = float(name) if frac is None and name != "none" else frac
            limit = None if frac is None else max(biggest, int(total * frac))
            cache = None if frac is None else tmp / f"cache-{name}"
            rows = run(url, store, limit, cache, a.epochs, a.workers, a.shuffle_buffer)
            for r in rows:
                results.append({"cache": name, "limit": limit, **r})
                print(results[-1], flush=True)
            if cache is not None:
                shutil.rmtree(cache, ignore_errors=True)
    finally:
        store.close()
        shutil.rmtree(tmp, ignore_errors=True)
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs; {load}")
    print(f"set: {len(local_refs)} shards, {total} bytes ({total / 1e6:.2f} MB); rate "
          f"{a.rate or 'unpaced'} MB/s, delay {a.delay} s per GET; {a.workers} reader threads")
    print("\n| cache | limit (bytes) | epoch | GET requests | GET bytes | all requests | s | "
          "hits | fetched | evicted |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if r["epoch"] == "setup":
            continue
        print(f"| {r['cache']} | {r['limit'] or '-'} | {r['epoch']} | {r['get_requests']} | "
              f"{r['get_bytes']} | {r['requests']} | {r['seconds']} | {r['cache_hits']} | "
              f"{r['cache_fetched']} | {r['cache_evicted']} |")
    if a.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
