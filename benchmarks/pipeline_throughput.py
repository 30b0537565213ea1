"""Two-view augmentation throughput: DALI on the GPU, DALI in CPU mode, torchvision.

Two measurements per backend, in images per second (one image = both of its views):
- `loader`: the whole TwoViewLoader (ShardStream reading the shards, validation, host-drawn
  parameters, augmentation, hand-off), what a training step sees;
- `graph`: the backend alone on encoded images already in memory (what the augmentation
  costs by itself, the number to compare with the H100 targets);
- `host`: the loader's Python-side work alone (header check, sizes, drawing the parameters),
  the ceiling the host side puts on any backend;
plus `torchvision-dataloader`: the classic baseline, a torch DataLoader whose workers decode
with PIL and run the recipe as a torchvision v2 Compose per sample.

    python benchmarks/pipeline_throughput.py ../shared/data/cifar10 --recipe byol_cifar
    python benchmarks/make_large_jpeg_shards.py /tmp/large && \\
    python benchmarks/pipeline_throughput.py /tmp/large --recipe byol_imagenet --batch-size 64

Each variant runs for about `--seconds` after one warm-up batch. Record results in
BENCHMARKS.md with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch


def _sync() -> None:
    """GPU work is asynchronous: a rate is only true once the device has finished it."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(batches, seconds: float, batch_size: int) -> tuple[float, int]:
    """Images/s over whole batches after the first (warm-up), stopping after `seconds`;
    the clock starts and stops on a synchronised device (no per-batch sync in between)."""
    it = iter(batches)
    next(it)
    _sync()
    n, t0 = 0, time.perf_counter()
    for _ in it:
        n += batch_size
        if time.perf_counter() - t0 >= seconds:
            break
    _sync()
    dt = time.perf_counter() - t0
    return (n / dt if dt > 0 else 0.0), n


def _memory_samples(source: str, count: int):
    from sslstream.pipelines.shards.stream import ShardStream

    stream = ShardStream(source, shuffle=False, num_workers=1)
    out = []
    for s in stream:
        out.append(s)
        if len(out) == count:
            break
    return out


def graph_only(backend_name: str, recipe, samples, batch_size: int, seconds: float,
               threads: int, device_id: int | None) -> tuple[float, int]:
    from sslstream.pipelines.views.backend import image_hw
    from sslstream.pipelines.views.recipes import batch_rng, sample_view_params

    images = [s.image for s in samples[:batch_size]]
    hw = np.array([image_hw(b, "header") for b in images])
    if backend_name == "dali":
        from sslstream.pipelines.views.dali import DaliTwoView, GraphSpec

        backend = DaliTwoView(GraphSpec(recipe=recipe, batch_size=batch_size, device_id=device_id,
                                        num_threads=threads))
    else:
        from sslstream.pipelines.views.reference import TorchvisionTwoView

        backend = TorchvisionTwoView(recipe, num_threads=threads)

    def gen():
        k = 0
        while True:
            params = tuple(sample_view_params(v, hw, batch_rng(0, 0, 0, k, i))
                           for i, v in enumerate(recipe.views))
            v1, v2 = backend.run(images, params)
            k += 1
            yield v1

    try:
        return _timed(gen(), seconds, batch_size)
    finally:
        backend.close()


def host_only(recipe, samples, batch_size: int, seconds: float) -> tuple[float, int]:
    """The loader's Python-side work per batch, on one thread, as it runs on a ShardStream
    (which has header-checked already): read each size, draw both views' parameters (the
    cost of resumable, host-side randomness)."""
    from sslstream.pipelines.views.backend import image_hw
    from sslstream.pipelines.views.recipes import batch_rng, sample_view_params

    images = [s.image for s in samples[:batch_size]]

    def gen():
        k = 0
        while True:
            hw = np.array([image_hw(b, "none") for b in images])
            params = tuple(sample_view_params(v, hw, batch_rng(0, 0, 0, k, i))
                           for i, v in enumerate(recipe.views))
            k += 1
            yield params

    return _timed(gen(), seconds, batch_size)


def loader(backend_name: str, recipe, source: str, batch_size: int, seconds: float, threads: int,
           device: str) -> tuple[float, int]:
    from sslstream.pipelines.shards.stream import ShardStream
    from sslstream.pipelines.views.loader import TwoViewLoader

    stream = ShardStream(source, num_workers=2, shuffle_buffer=1000)
    ld = TwoViewLoader(stream, recipe, batch_size=batch_size, device=device, backend=backend_name,
                       num_threads=threads, prefetch=3)

    def epochs():  # as many epochs as `seconds` needs (a small set is one epoch in ms on a GPU)
        for epoch in range(1_000_000):
            ld.set_epoch(epoch)
            yield from ld

    try:
        return _timed(epochs(), seconds, batch_size)
    finally:
        ld.close()


def torchvision_dataloader(recipe, samples, batch_size: int, seconds: float,
                           workers: int) -> tuple[float, int]:
    from sslstream.pipelines.views.reference import TwoViewDataset

    ds = TwoViewDataset([s.image for s in samples], recipe)
    dl = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                                     num_workers=workers, persistent_workers=workers > 0)

    def forever():
        while True:
            yield from dl

    return _timed(forever(), seconds, batch_size)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="shard folder / manifest / brace pattern")
    ap.add_argument("--recipe", default="byol_cifar")  # a conf/recipe/ file
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 2))
    ap.add_argument("--samples", type=int, default=1024, help="in-memory samples for graph runs")
    ap.add_argument("--variants", default="all",
                    help="comma list of host,dali-gpu,dali-cpu,torchvision,"
                         "torchvision-dataloader (dali/torchvision: as graph and as loader)")
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, a.threads))
    from sslstream.orchestration.schema import augment_recipe
    from sslstream.pipelines.views.dali import DALI_AVAILABLE

    recipe = augment_recipe(a.recipe)
    gpu = torch.cuda.is_available()
    wanted = ["host", "dali-gpu", "dali-cpu", "torchvision", "torchvision-dataloader"] \
        if a.variants == "all" else a.variants.split(",")
    samples = _memory_samples(a.source, max(a.samples, a.batch_size))
    results = []
    for v in wanted:
        if v.startswith("dali") and not DALI_AVAILABLE:
            print(f"skip {v}: nvidia-dali not importable", file=sys.stderr)
            continue
        if v == "dali-gpu" and not gpu:
            print("skip dali-gpu: no CUDA device", file=sys.stderr)
            continue
        runs = []
        if v == "host":
            runs.append(("host", lambda: host_only(recipe, samples, a.batch_size, a.seconds)))
        elif v == "torchvision-dataloader":
            runs.append(("dataloader", lambda: torchvision_dataloader(
                recipe, samples, a.batch_size, a.seconds, a.threads)))
        else:
            name = "dali" if v.startswith("dali") else "torchvision"
            dev_id, device = (0, "cuda:0") if v == "dali-gpu" else (None, "cpu")
            runs.append(("graph", lambda name=name, dev_id=dev_id: graph_only(
                name, recipe, samples, a.batch_size, a.seconds, a.threads, dev_id)))
            runs.append(("loader", lambda name=name, device=device: loader(
                name, recipe, a.source, a.batch_size, a.seconds, a.threads, device)))
        for kind, fn in runs:
            rate, n = fn()
            row = {"variant": v, "measure": kind, "recipe": a.recipe, "batch_size": a.batch_size,
                   "threads": a.threads, "img_per_s": round(rate, 1), "images": n}
            results.append(row)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
