"""kNN at scale: time and peak memory of one rank's kNN, new (sharded, chunked) vs old.

Each measurement runs in a fresh process: a synthetic fp16 bank (built in blocks, no
full-size temporary) and queries, then the kNN call, with the peak resident memory reset
just before it (/proc/self/clear_refs) so `added` is what the call itself took. `rank
share` simulates one rank of a W-rank job: it holds ceil(M / W) bank rows and scores every
query (the merge across ranks moves q x k x W x 24 bytes per chunk, not timed here).

    python benchmarks/knn_scale.py --banks 100000 400000 1280000 --queries 1000 --old
    python benchmarks/knn_scale.py --banks 1280000 --world 8 --queries 10000

The old code (`old_knn_predict`, orchestration/evaluate/knn.py before the sharded kNN) is
kept here verbatim for this comparison only. Speed on a shared machine: compare within one
run, and read `uptime` (printed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F


@torch.no_grad()
def old_knn_predict(query, bank, bank_labels, num_classes, k=200, t=0.1, chunk=1024):
    """The pre-sharding kNN: a (chunk x M) fp32 similarity block per query chunk."""
    q = F.normalize(query.float(), dim=1)
    b = F.normalize(bank.float(), dim=1)
    k = min(k, b.shape[0])
    preds = []
    for s in range(0, q.shape[0], chunk):
        sim = q[s : s + chunk] @ b.T  # (n, M)
        w, idx = sim.topk(k, dim=1)
        lab = bank_labels[idx]  # (n, k)
        scores = torch.zeros(sim.shape[0], num_classes, device=q.device)
        scores.scatter_add_(1, lab, (w / t).exp())
        preds.append(scores.argmax(dim=1))
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.long)


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> dict:
    """One measurement, in this (fresh) process."""
    from sslstream.orchestration.evaluate.knn import knn_memory_bytes, quantize, sharded_knn_predict

    torch.set_num_threads(args.threads)
    m, n, d = -(-args.bank // args.world), args.queries, args.dim
    g = torch.Generator().manual_seed(0)
    bank = torch.empty(m, d, dtype=torch.float16)
    for s in range(0, m, 8192):
        rows = torch.randn(min(8192, m - s), d, generator=g)
        bank[s : s + 8192] = quantize(rows, block=2048) if args.code == "new" else rows.half()
    labels = torch.randint(0, 1000, (m,), generator=g)
    query = torch.randn(n, d, generator=g)
    query = quantize(query) if args.code == "new" else query.half()
    index = torch.arange(m)
    # warm-up (kernels, thread pools) so the measurement is the call's working memory
    few = min(m, 2 * args.bank_chunk)
    if args.code == "new":
        sharded_knn_predict(query[:8], bank[:few], labels[:few], index[:few], 1000, args.k, 0.1,
                            bank_chunk=args.bank_chunk, distributed=False)
    else:
        old_knn_predict(query[:8], bank[:few], labels[:few], 1000, args.k, 0.1)
    base = _rss("VmRSS:")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    t0 = time.perf_counter()
    if args.code == "new":
        sharded_knn_predict(query, bank, labels, index, 1000, args.k, 0.1,
                            query_chunk=args.query_chunk, bank_chunk=args.bank_chunk,
                            distributed=False)
    else:
        old_knn_predict(query, bank, labels, 1000, args.k, 0.1, chunk=args.query_chunk)
    seconds = time.perf_counter() - t0
    peak = _rss("VmHWM:")
    bound = knn_memory_bytes(m, n, d, 1, k=args.k, query_chunk=args.query_chunk,
                             bank_chunk=args.bank_chunk)
    return {"code": args.code, "bank": args.bank, "world": args.world, "rows": m, "queries": n,
            "seconds": seconds, "added_mib": (peak - base) / 2**20, "peak_mib": peak / 2**20,
            "data_mib": base / 2**20, "bound_mib": bound / 2**20, "threads": args.threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--banks", type=int, nargs="+", default=[100_000, 400_000, 1_280_000])
    p.add_argument("--queries", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--k", type=int, default=200)
    p.add_argument("--world", type=int, default=1, help="simulate one rank of this many")
    p.add_argument("--threads", type=int, default=1, help="torch threads (set explicitly)")
    p.add_argument("--query-chunk", type=int, default=1024)
    p.add_argument("--bank-chunk", type=int, default=16384)
    p.add_argument("--old", action="store_true", help="also time the old code")
    p.add_argument("--old-max-bank", type=int, default=400_000,
                   help="skip the old code above this bank (its q x M block: 5 GB at 1.28M)")
    p.add_argument("--code", choices=["new", "old"], help=argparse.SUPPRESS)
    p.add_argument("--bank", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.code:
        print(json.dumps(child(args)))
        return
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
          f"{os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f} {os.getloadavg()[2]:.2f}; "
          f"{os.cpu_count()} cores; torch {torch.__version__}, {args.threads} thread(s)")
    print("| code | bank M | W | rows/rank | queries | seconds | resident before MiB "
          "| added by the call MiB | bound (total) MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "MALLOC_MMAP_THRESHOLD_": "65536"}
    for bank in args.banks:
        for code in ["new"] + (["old"] if args.old and bank // args.world <= args.old_max_bank else []):
            cmd = [sys.executable, __file__, "--code", code, "--bank", str(bank)] + [
                a for a in sys.argv[1:] if a != "--old"]
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(f"| {code} | {bank} | failed: {out.stderr.strip().splitlines()[-1:]} |")
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            bound = f"{r['bound_mib']:.0f}" if code == "new" else "-"
            print(f"| {code} | {bank:,} | {r['world']} | {r['rows']:,} | {r['queries']:,} | "
                  f"{r['seconds']:.1f} | {r['data_mib']:.0f} | {r['added_mib']:.0f} | {bound} |",
                  flush=True)
    print(f"# load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
