"""How much of the feed runs in the trainer process, old design vs new (issue 10).

Old design: `TwoViewLoader(workers=0)`: the stream's reader lanes, validation and parameter
drawing are threads of the trainer process and share its GIL with the training loop.
New design: `workers=N`: a reader process per rank (plus N-1 lane processes) does that work;
the trainer process receives ready batches.

Measured, per design, on the same stream:
  (a) the loader alone: img/s with a consumer that does nothing;
  (b) a training step of fixed length T per batch: a pure-Python busy loop (the step's op
      dispatch: it holds the GIL) for X% of T, then a sleep for the rest (waiting on the
      GPU: the GIL is free), X = 0, 50, 80: img/s and the fraction of the time the consumer
      waited for data. T = the old design's loader-alone time per batch, so the ideal is the
      old design's alone rate, and both designs get the same Python work;
  (c) CPU seconds of the trainer process (all its threads: time.process_time) per batch of
      256, in (a).
The augmentation backend is replaced by `--backend none` (default): a stub that does the host
side of the GPU path (np.frombuffer per image) and no decoding, since on a GPU the decode is
not on the host CPU; `--backend dali` runs DALI's CPU graph in the trainer process (both
designs pay it equally).

    python benchmarks/feed_headroom.py SHARDS [--batch 256] [--batches 40] [--workers 0 1 2]

Numbers are only comparable within one run (the machine is shared): the script prints the
load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.shards.stream import ShardStream
from sslstream.pipelines.views.loader import TwoViewLoader


class NullBackend:
    """The host side of the GPU path without decoding: one array view per image."""

    name = "none"

    def run(self, images, params):
        for b in images:
            np.frombuffer(b, dtype=np.uint8)
        return torch.empty(0), torch.empty(0)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        pass


def busy(seconds: float) -> None:
    """Pure Python for `seconds`: holds the GIL like the step's op dispatch does."""
    end = time.perf_counter() + seconds
    x = 0
    while time.perf_counter() < end:
        for i in range(200):
            x += i


def make_loader(url: str, workers: int, batch: int, backend: str, recipe: str,
                lanes: int) -> TwoViewLoader:
    stream = ShardStream(url, num_workers=lanes, shuffle_buffer=1000, seed=0)
    loader = TwoViewLoader(stream, augment_recipe(recipe), batch_size=batch, device="cpu",
                           backend="torchvision" if backend == "none" else backend,
                           num_threads=1, workers=workers, prefetch=2)
    if backend == "none":
        loader._backend.close()
        loader._backend = NullBackend()
    return loader


def _batches(loader: TwoViewLoader):
    """Batches across epochs (a small data set runs several epochs)."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def run(loader: TwoViewLoader, batches: int, busy_s: float, step_s: float = 0.0,
        warmup: int = 3) -> dict:
    it = _batches(loader)
    for _ in range(warmup):  # process start, first reads, shuffle buffer fill
        next(it)
    wait0, t0, c0 = loader.data_wait_s, time.perf_counter(), time.process_time()
    n = 0
    for _ in it:
        if busy_s:
            busy(busy_s)
        if step_s > busy_s:
            time.sleep(step_s - busy_s)
        n += 1
        if n == batches:
            break
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    wait = loader.data_wait_s - wait0
    it.close()
    loader.close_epoch()
    return {"img_s": n * loader.batch_size / wall, "wait_frac": wait / wall,
            "cpu_ms_per_256": 1000 * cpu / (n * loader.batch_size / 256), "batches": n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("shards")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--busy", type=int, nargs="+", default=[0, 50, 80])
    ap.add_argument("--backend", default="none", choices=["none", "dali", "torchvision"])
    ap.add_argument("--recipe", default="byol_cifar")  # a conf/recipe/ file
    ap.add_argument("--lanes", type=int, default=2, help="the stream's reader lanes")
    ap.add_argument("--step-ms", type=float, default=None,
                    help="fix T (ms per batch) instead of the old design's alone time; "
                         "12.8 = a 256-image step at the 20,000 img/s target")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}; cpus {len(os.sched_getaffinity(0))}")
    rows = []
    ref_step = None
    for w in a.workers:
        loader = make_loader(a.shards, w, a.batch, a.backend, a.recipe, a.lanes)
        try:
            alone = run(loader, a.batches, 0.0)
            if ref_step is None:  # the old design's time per batch, alone
                ref_step = a.step_ms / 1000 if a.step_ms else a.batch / alone["img_s"]
            rows.append({"workers": w, "busy_pct": "alone", **alone})
            for x in a.busy:
                r = run(loader, a.batches, ref_step * x / 100, ref_step)
                rows.append({"workers": w, "busy_pct": x, **r})
        finally:
            loader.close()
    print(f"load average after: {os.getloadavg()}")
    what = "fixed by --step-ms" if a.step_ms else "old design alone"
    print(f"reference step T ({what}): {1000 * ref_step:.1f} ms per batch of {a.batch}")
    print("| design | step: busy % of T | img/s | data-wait fraction | trainer CPU ms / 256 img |")
    print("|---|---|---|---|---|")
    for r in rows:
        name = "old (threads)" if r["workers"] == 0 else f"new ({r['workers']} worker proc.)"
        cpu = f"{r['cpu_ms_per_256']:.2f}" if r["busy_pct"] == "alone" else "-"
        print(f"| {name} | {r['busy_pct']} | {r['img_s']:.0f} | {r['wait_frac']:.2f} | {cpu} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
