"""A weighted mix's realised proportions against the configured ones, over whole epochs read
from S3 (moto): the CIFAR-10 train shards split into two sources (issue 25).

    python benchmarks/mix_proportions.py                      # weights 3:1, 4 ranks, 2 epochs
    python benchmarks/mix_proportions.py --weights 1 1 --ranks 2 --epochs 1 --json

Source A is train shards 0-7 (40,000 samples), source B shards 8-9 (10,000), each under its
own prefix with its own manifest. Every rank's stream (pipelines/shards/stream.py, exactly
as the trainer builds it: 4 lanes, shuffle buffer 5,000, header checks) reads its whole
epoch from the moto server; each yielded sample is counted by the source its shard belongs
to. Reported per epoch: the configured share, the per-epoch quota (mix.py), the realised
count over all ranks, each rank's share (min / max), and the share within windows of 1,000
consecutive samples of one rank (min / max: how finely the mix is interleaved).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CREDS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
         "AWS_DEFAULT_REGION": "us-east-1"}
WINDOW = 1000


def upload(cifar: Path, endpoint: str) -> list[str]:
    """Two sources on s3://mix/a and s3://mix/b, each with a manifest of its shards."""
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint})
    fs.mkdir("mix")
    doc = json.loads((cifar / "manifest.json").read_text())
    entries = doc["train"]
    parts = {"a": entries[:8], "b": entries[8:]}
    for name, shards in parts.items():
        for e in shards:
            fs.put_file(str(cifar / e["shard"]), f"mix/{name}/{e['shard']}")
        fs.pipe_file(f"mix/{name}/manifest.json",
                     json.dumps({"shards": shards, "classes": doc["classes"]}).encode())
    return [f"s3://mix/{name}" for name in parts]


def measure(urls: list[str], weights: list[float], ranks: int, epochs: int,
            endpoint: str) -> list[dict]:
    from sslstream.pipelines.shards.stream import ShardStream

    spec = [{"url": u, "weight": w} for u, w in zip(urls, weights, strict=True)]
    opts = {"client_kwargs": {"endpoint_url": endpoint}}
    out = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        per_rank, windows = [], []
        quotas = planned = None
        for r in range(ranks):
            s = ShardStream(spec, rank=r, world_size=ranks, num_workers=4, seed=0,
                            shuffle_buffer=5000, storage_options=opts)
            s.set_epoch(epoch)
            quotas, planned = s.source_quotas, s.source_counts(epoch)
            counts, window = [0] * len(urls), [0] * len(urls)
            for i, x in enumerate(s, 1):
                src = next(j for j, u in enumerate(urls) if x.shard.startswith(u + "/"))
                counts[src] += 1
                window[src] += 1
                if i % WINDOW == 0:
                    windows.append(window[0] / WINDOW)
                    window = [0] * len(urls)
            per_rank.append(counts)
        total = [sum(c[i] for c in per_rank) for i in range(len(urls))]
        n = sum(total)
        out.append({
            "epoch": epoch, "seconds": round(time.perf_counter() - t0, 1),
            "configured_share": [w / sum(weights) for w in weights],
            "quota": quotas, "planned": planned, "realised": total,
            "realised_share": [t / n for t in total],
            "rank_share_a": [min(c[0] / sum(c) for c in per_rank),
                             max(c[0] / sum(c) for c in per_rank)],
            "window_share_a": [min(windows), max(windows)] if windows else None,
        })
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cifar", default=os.environ.get(
        "SSLSTREAM_CIFAR10", str(ROOT.parent.parent / "shared/data/cifar10")))
    ap.add_argument("--weights", type=float, nargs=2, default=[3.0, 1.0])
    ap.add_argument("--ranks", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's request log
    os.environ.update(CREDS)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    from moto.server import ThreadedMotoServer

    torch.set_num_threads(1)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        urls = upload(Path(a.cifar), endpoint)
        rows = measure(urls, a.weights, a.ranks, a.epochs, endpoint)
    finally:
        server.stop()
    meta = {"machine": platform.platform(), "cpus": os.cpu_count(),
            "load": os.getloadavg(), "command": " ".join([sys.executable, *sys.argv]),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    if a.json:
        print(json.dumps({"meta": meta, "epochs": rows}, indent=1))
        return
    print(meta)
    for r in rows:
        print(f"epoch {r['epoch']} ({r['seconds']} s): configured {r['configured_share']}, "
              f"quota {r['quota']}, realised {r['realised']} "
              f"({', '.join(f'{s:.4f}' for s in r['realised_share'])}); rank share of A "
              f"{r['rank_share_a'][0]:.4f}..{r['rank_share_a'][1]:.4f}; windows of {WINDOW}: "
              f"{r['window_share_a'][0]:.3f}..{r['window_share_a'][1]:.3f}")


if __name__ == "__main__":
    main()
