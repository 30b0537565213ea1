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

`--local-count N --local-size S` measures multi-crop instead: the `graph` of each DALI /
torchvision variant with the recipe's two global views alone and with N local crops of S px
added, alternating the two `--rounds` times in one run, and prints their ratio (one image =
all of its crops; the ratio is the multi-crop graph's images/s over the two-view one's).

    python benchmarks/pipeline_throughput.py ../shared/data/cifar10 --recipe byol_cifar
    python benchmarks/make_large_jpeg_shards.py /tmp/large && \\
    python benchmarks/pipeline_throughput.py /tmp/large --recipe byol_imagenet --batch-size 64
    python benchmarks/pipeline_throughput.py ../shared/data/cifar10 --recipe byol_cifar \
        --local-count 6 --local-size 16 --variants dali-cpu,torchvision --threads 1

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
            views = backend.run(images, params)
            k += 1
            yield views[0]

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


def with_local_crops(recipe, count: int, size: int, blur_p: float | None):
    """`recipe` plus `count` local crops of `size` px (blur probability `blur_p`, or the
    recipe's local value)."""
    import dataclasses

    local = {"count": count, "size": size} | ({} if blur_p is None else {"blur_p": blur_p})
    return dataclasses.replace(recipe, local=dataclasses.replace(recipe.local, **local))


def multicrop_ratio(variant: str, recipe, multi, samples, a) -> list[dict]:
    """The graph alone, two-view vs multi-crop, alternating `a.rounds` times (a loaded
    machine drifts: alternating puts the drift on both); the ratio of the medians."""
    name = "dali" if variant.startswith("dali") else "torchvision"
    dev_id = 0 if variant == "dali-gpu" else None
    rates: dict[str, list[float]] = {"two-view": [], "multi-crop": []}
    for _ in range(a.rounds):
        for label, r in (("two-view", recipe), ("multi-crop", multi)):
            rate, _ = graph_only(name, r, samples, a.batch_size, a.seconds, a.threads, dev_id)
            rates[label].append(rate)
    two, many = (float(np.median(rates[k])) for k in ("two-view", "multi-crop"))
    row = {"variant": variant, "measure": "graph", "recipe": a.recipe,
           "crops": f"2x{recipe.size} + {a.local_count}x{a.local_size}",
           "batch_size": a.batch_size, "threads": a.threads,
           "two_view_img_per_s": round(two, 1), "multi_crop_img_per_s": round(many, 1),
           "ratio": round(many / two, 3) if two else None,
           "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()}}
    print(json.dumps(row), flush=True)
    return [row]


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
    ap.add_argument("--local-count", type=int, default=0,
                    help="> 0: measure multi-crop (this many local crops) against two views")
    ap.add_argument("--local-size", type=int, default=16, help="local crop side in pixels")
    ap.add_argument("--local-blur-p", type=float, default=None,
                    help="local crops' blur probability (default: the recipe's; DINO: 0.5)")
    ap.add_argument("--rounds", type=int, default=2, help="multi-crop: alternations per variant")
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
    if a.local_count > 0:
        multi = with_local_crops(recipe, a.local_count, a.local_size, a.local_blur_p)
        for v in wanted:
            if v.startswith("dali") and not DALI_AVAILABLE or v == "dali-gpu" and not gpu:
                print(f"skip {v}: not available here", file=sys.stderr)
            elif v in ("dali-gpu", "dali-cpu", "torchvision"):
                results += multicrop_ratio(v, recipe, multi, samples, a)
        return 0
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
