"""TwoViewLoader and the eval loader: batch counts, resume, shutdown, data-wait, eval coverage.

Run on the real ShardStream over shards written by tests/fixtures/shards.py where the data
plane matters (rank balance, corrupt members), and on a list-backed stream where timing or
identity matters. DALI runs in CPU mode; tests that need it skip where it does not import.
"""

from __future__ import annotations

import dataclasses
import io
import os
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.shards.imagesize import image_hw as read_hw
from sslstream.pipelines.shards.stream import ShardStream
from sslstream.pipelines.shards.validate import CorruptImage
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views import loader as loader_mod
from sslstream.pipelines.views.eval_loader import EvalLoader, build_eval_loader
from sslstream.pipelines.views.loader import TwoViewLoader

from tests.pipelines.augment_helpers import FakeStream, make_samples

needs_dali = pytest.mark.skipif(not dali_mod.DALI_AVAILABLE,
                                reason=f"nvidia-dali not importable: {dali_mod.DALI_IMPORT_ERROR}")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torchvision"]
WORKERS = [0, 2]  # reading in this process; a reader process + a lane process (workers.py)
RECIPE = augment_recipe("byol_cifar")


def _tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def _collect(loader, n: int | None = None):
    out = []
    for i, b in enumerate(loader):
        out.append(b)
        if n is not None and i + 1 == n:
            break
    return out


def _same(a, b) -> bool:
    return (a.keys == b.keys and torch.equal(a.labels, b.labels)
            and torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_batch_counts_per_rank(backend, workers, shard_factory):
    """61 samples over 5 uneven shards, 2 ranks, batch 8: both ranks take 30 // 8 = 3 steps
    of exactly 8, over two epochs, even with corrupt members in the shards."""
    shards = shard_factory([17, 5, 23, 9, 7], corrupt={(0, 3): "bad_header", (2, 4): "cut_jpeg"})
    steps = []
    for rank in range(2):
        stream = ShardStream(shards.urls, rank=rank, world_size=2, num_workers=1, seed=1,
                             max_bad_fraction=0.2)
        loader = TwoViewLoader(stream, RECIPE, batch_size=8, device="cpu", backend=backend, seed=3,
                               workers=workers)
        try:
            assert len(loader) == len(stream) // 8 == 3
            for epoch in range(2):
                loader.set_epoch(epoch)
                batches = list(loader)
                assert [b.view1.shape[0] for b in batches] == [8, 8, 8]
                assert all(b.view2.shape == (8, 3, 32, 32) and b.labels.dtype == torch.int64
                           for b in batches)
                assert set(k for b in batches for k in b.keys) <= shards.good_keys
                steps.append(len(batches))
            assert loader.counters["batches"] == 6
            assert loader.counters["skipped_corrupt"] >= 1  # the stream's own counter comes through
        finally:
            loader.close()
    assert steps == [3, 3, 3, 3]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_k_batches_is_bitwise_identical(backend, workers, shard_factory):
    """Stop after k batches, save, rebuild everything from scratch, load, continue: the
    remaining batches (this epoch and the next) equal the uninterrupted run's, bit for bit."""
    shards = shard_factory([20, 14, 18])

    def make():
        stream = ShardStream(shards.urls, num_workers=2, seed=5, shuffle_buffer=16)
        return TwoViewLoader(stream, RECIPE, batch_size=6, device="cpu", backend=backend, seed=11,
                             workers=workers)

    ref_loader = make()
    try:
        reference = []
        for epoch in range(2):
            ref_loader.set_epoch(epoch)
            reference.append(_collect(ref_loader))
    finally:
        ref_loader.close()
    assert len(reference[0]) == 52 // 6 and not _same(reference[0][0], reference[1][0])

    k = 3
    first = make()
    try:
        first.set_epoch(0)
        head = _collect(first, k)
        state = first.state_dict()
    finally:
        first.close()
    assert all(_same(a, b) for a, b in zip(head, reference[0][:k], strict=True))
    assert state["batch"] == k

    resumed = make()
    try:
        resumed.load_state_dict(state)
        resumed.set_epoch(0)  # the trainer's loop calls this; it must keep the cursor
        rest = _collect(resumed)
        resumed.set_epoch(1)
        nxt = _collect(resumed)
    finally:
        resumed.close()
    assert len(rest) == len(reference[0]) - k
    assert all(_same(a, b) for a, b in zip(rest, reference[0][k:], strict=True))
    assert all(_same(a, b) for a, b in zip(nxt, reference[1], strict=True))


@pytest.mark.timeout(60)
def test_epoch_cursor_semantics():
    """Iterating again re-runs the epoch (same batches); a state saved at the end of an epoch
    resumes to 'nothing left' even if the trainer calls set_epoch(same) again."""
    samples = make_samples(12)
    loader = TwoViewLoader(FakeStream(samples), RECIPE, batch_size=4, device="cpu",
                           backend="torchvision")
    try:
        a, b = _collect(loader), _collect(loader)
        assert len(a) == len(b) == 3 and all(_same(x, y) for x, y in zip(a, b, strict=True))
        end_state = loader.state_dict()
        assert end_state["batch"] == 3
    finally:
        loader.close()
    resumed = TwoViewLoader(FakeStream(samples), RECIPE, batch_size=4, device="cpu",
                            backend="torchvision")
    try:
        resumed.load_state_dict(end_state)
        resumed.set_epoch(0)
        assert _collect(resumed) == []
        resumed.set_epoch(1)
        assert len(_collect(resumed)) == 3
    finally:
        resumed.close()


@pytest.mark.timeout(60)
def test_seed_changes_views_not_samples():
    samples = make_samples(16)
    out = {}
    for seed in (0, 0, 1):
        loader = TwoViewLoader(FakeStream(samples), RECIPE, batch_size=8, device="cpu",
                               backend="torchvision", seed=seed)
        try:
            out.setdefault(seed, []).append(_collect(loader))
        finally:
            loader.close()
    a, b = out[0]
    (c,) = out[1]
    assert all(_same(x, y) for x, y in zip(a, b, strict=True))
    assert [x.keys for x in a] == [x.keys for x in c]
    assert not torch.equal(a[0].view1, c[0].view1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["list", "shards"])
def test_break_and_close_leave_no_threads(backend, source, workers, shard_factory):
    """Abandon an epoch half way, iterate again, close: no Python thread and no native
    (DALI / thread-pool / stream reader) thread outlives the loader, and nothing hangs."""
    stream = FakeStream(make_samples(48)) if source == "list" else \
        ShardStream(shard_factory([20, 28]).urls, num_workers=2)
    time.sleep(0.2)
    threads_before, tasks_before = set(threading.enumerate()), _tasks()
    loader = TwoViewLoader(stream, RECIPE, batch_size=8, device="cpu",
                           backend=backend, prefetch=2, workers=workers)
    assert len(_collect(loader, 2)) == 2
    assert len(_collect(loader)) == 4  # the break kept the cursor: 6 - 2 batches remain
    loader.set_epoch(1)
    assert len(_collect(loader, 1)) == 1
    pids = loader.worker_pids
    assert len(pids) == (2 if workers and source == "shards" else 1 if workers else 0)
    t0 = time.monotonic()
    loader.close()
    assert time.monotonic() - t0 < 10
    assert not [p for p in pids if Path(f"/proc/{p}").exists()]  # reaped, not orphaned
    for _ in range(50):
        if set(threading.enumerate()) <= threads_before and _tasks() <= tasks_before:
            break
        time.sleep(0.1)
    assert set(threading.enumerate()) <= threads_before, threading.enumerate()
    assert _tasks() <= tasks_before
    with pytest.raises(RuntimeError, match="closed"):
        list(loader)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", WORKERS)
def test_data_wait_measures_a_slow_stream_and_prefetch_hides_it(workers):
    """A stream taking 0.2 s per batch: a consumer that does not work waits ~that long per
    batch; a consumer that works 0.4 s per step barely waits (the threads read ahead)."""
    samples = make_samples(40, h=24, w=24)
    loader = TwoViewLoader(FakeStream(samples, delay_s=0.025), RECIPE, batch_size=8,
                           device="cpu", backend="torchvision", prefetch=2, workers=workers)
    try:
        _collect(loader)
        hungry = loader.data_wait_s
        assert hungry >= 0.8, hungry  # 5 batches x 0.2 s of reading
        loader.set_epoch(1)
        waits = []
        for batch in loader:
            waits.append(loader.last_wait_s)
            time.sleep(0.4)  # the "training step"
            assert batch.view1.shape[0] == 8
        assert sum(waits[1:]) < 0.5 * sum([hungry / 5] * 4), waits
        assert loader.data_wait_s == pytest.approx(hungry + sum(waits))
    finally:
        loader.close()


@pytest.mark.timeout(60)
def test_stream_errors_surface_in_the_consumer():
    class Broken(FakeStream):
        def __iter__(self):
            yield from list(super().__iter__())[:3]
            raise OSError("s3://bucket/shard-000003.tar: connection reset")

    loader = TwoViewLoader(Broken(make_samples(16)), RECIPE, batch_size=2, device="cpu",
                           backend="torchvision")
    try:
        with pytest.raises(OSError, match="shard-000003"):
            list(loader)
    finally:
        loader.close()


def test_image_sizes_from_headers_match_pil(shard_factory):
    img = np.zeros((37, 53, 3), np.uint8)
    blobs = {}
    for fmt, kw in (("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("WEBP", {})):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format=fmt, **kw)
        blobs[f"{fmt}{kw}"] = buf.getvalue()
    gray = io.BytesIO()
    Image.fromarray(img[..., 0]).save(gray, format="JPEG")
    blobs["gray"] = gray.getvalue()
    for name, data in blobs.items():
        assert read_hw(data) == (37, 53), name
        assert loader_mod.image_hw(data, "header") == (37, 53), name
    for bad in (b"", b"<html>", b"\xff\xd8\xff\xe0\x00\x10JFIF" + b"\x00" * 10):
        with pytest.raises(CorruptImage):
            read_hw(bad)
    # a ShardStream has header-checked its samples: the loader only reads sizes then
    checked = ShardStream(shard_factory([3]).urls)
    assert loader_mod.effective_validation("auto", checked) == "none"
    assert loader_mod.effective_validation("auto", FakeStream([])) == "header"
    assert loader_mod.effective_validation("decode", checked) == "decode"


def test_auto_backend_falls_back_with_a_warning(monkeypatch):
    monkeypatch.setattr(dali_mod, "DALI_AVAILABLE", False)
    monkeypatch.setattr(dali_mod, "DALI_IMPORT_ERROR", "ImportError: no nvidia.dali")
    with pytest.warns(UserWarning, match="torchvision reference"):
        assert loader_mod.resolve_backend("auto") == "torchvision"
    with pytest.raises(RuntimeError, match="not importable"):
        loader_mod.resolve_backend("dali")
    with pytest.raises(ValueError, match="backend='jax'"):
        loader_mod.resolve_backend("jax")


@needs_dali
def test_auto_backend_picks_dali_when_importable():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert loader_mod.resolve_backend("auto") == "dali"


def test_state_with_another_batch_size_is_refused():
    loader = TwoViewLoader(FakeStream(make_samples(8)), RECIPE, batch_size=4, device="cpu",
                           backend="torchvision")
    try:
        with pytest.raises(ValueError, match="batch_size=8"):
            loader.load_state_dict({"epoch": 0, "batch": 1, "batch_size": 8, "stream": {}})
    finally:
        loader.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_loader_yields_each_sample_once_across_ranks(backend):
    """Labels are unique sample ids: 3 ranks together see each of 23 samples exactly once,
    with the deterministic view (two passes identical); a corrupt one is skipped, counted."""
    samples = make_samples(23, h=36, w=44)
    samples[4] = dataclasses.replace(samples[4], image=b"<html>oops</html>")
    labels, outputs = [], {}
    for rank in range(3):
        ev = EvalLoader(FakeStream(samples), image_size=32, batch_size=4, device="cpu",
                        rank=rank, world_size=3, backend=backend)
        try:
            first = list(ev)
            outputs[rank] = ev.skipped_corrupt
            second = list(ev)
        finally:
            ev.close()
        assert len(first) <= len(ev)
        for (x1, y1), (x2, y2) in zip(first, second, strict=True):
            assert x1.shape[1:] == (3, 32, 32) and torch.equal(x1, x2) and torch.equal(y1, y2)
        labels += [int(v) for _, y in first for v in y]
    assert sorted(labels) == [i for i in range(23) if i != 4]
    assert sum(outputs.values()) == 1


@pytest.mark.timeout(60)
def test_eval_loader_on_shards_covers_the_split(shard_factory):
    shards = shard_factory([7, 5, 9])
    total = 0
    for rank in range(2):
        ev = build_eval_loader(shards.urls, image_size=16, batch_size=5, device="cpu",
                               rank=rank, world_size=2, num_workers=1, backend="torchvision")
        try:
            total += sum(len(y) for _, y in ev)
        finally:
            ev.close()
    assert total == 21


@pytest.mark.timeout(90)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cifar10_views_are_normalised_with_the_dataset_statistics(backend, cifar10_dir):
    """Real CIFAR-10 shards: the eval view normalised with the cifar presets' mean/std has
    per-channel mean ~0 and std ~1 (CIFAR-10's published statistics), and two-view batches
    come out finite with the right shapes."""
    recipe = augment_recipe("byol_cifar")
    ev = build_eval_loader(f"{cifar10_dir}#test", image_size=32, batch_size=500, device="cpu",
                           num_workers=1, backend=backend, mean=recipe.view1.mean,
                           std=recipe.view1.std)
    try:
        x = next(iter(ev))[0].double()
    finally:
        ev.close()
    assert x.shape == (500, 3, 32, 32)
    assert x.mean((0, 2, 3)).abs().max() < 0.1, x.mean((0, 2, 3))
    assert (x.std((0, 2, 3)) - 1).abs().max() < 0.1, x.std((0, 2, 3))
    stream = ShardStream(f"{cifar10_dir}#train", num_workers=1, shuffle_buffer=100)
    loader = TwoViewLoader(stream, recipe, batch_size=128, device="cpu", backend=backend)
    try:
        batch = next(iter(loader))
    finally:
        loader.close()
    assert batch.view1.shape == batch.view2.shape == (128, 3, 32, 32)
    assert torch.isfinite(batch.view1).all() and set(batch.labels.tolist()) <= set(range(10))


# The child: a fresh process builds the same stream + loader, restores each saved loader
# state and returns the rest of that epoch and the first batches of the next one.
_RESUME_CHILD = """
import json, sys, torch
from sslstream.pipelines.views.loader import TwoViewLoader
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.shards.stream import ShardStream
job = json.load(sys.stdin)
torch.set_num_threads(1)
out = []
for state in job["states"]:
    loader = TwoViewLoader(ShardStream(job["urls"], **job["stream"]), augment_recipe("byol_cifar"),
                           device="cpu", **job["loader"])
    try:
        loader.load_state_dict(state)
        loader.set_epoch(state["epoch"])
        rest = [(b.keys, b.labels, b.view1, b.view2) for b in loader]
        loader.set_epoch(state["epoch"] + 1)
        nxt = []
        for b in loader:
            nxt.append((b.keys, b.labels, b.view1, b.view2))
            if len(nxt) == 2:
                break
        out.append((rest, nxt))
    finally:
        loader.close()
torch.save(out, job["out"])
"""


@pytest.mark.timeout(150)
@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_saves_what_was_consumed_not_what_prefetch_read(backend, workers, shard_factory,
                                                               tmp_path):
    """The trainer checkpoints while the loader's threads have read several batches ahead
    (prefetch=4, the consumer idles until the stream is >= 3 batches past it). The saved
    state must be the consumer's: restored in a NEW process it yields exactly the batches the
    uninterrupted loop yielded after that point, then the next epoch, bit for bit. Shards of
    uneven size with a corrupt member, so the cursor also carries the bad-sample log."""
    import json
    import subprocess
    import sys

    shards = shard_factory([20, 14, 18], corrupt={(1, 3): "bad_header"})
    skw = {"num_workers": 2, "seed": 5, "shuffle_buffer": 16, "max_bad_fraction": 0.1}
    lkw = {"batch_size": 6, "backend": backend, "seed": 11, "prefetch": 4, "workers": workers}
    stream = ShardStream(shards.urls, **skw)
    loader = TwoViewLoader(stream, RECIPE, device="cpu", **lkw)
    ks, states, batches, read_ahead = (2, 5), [], [], []
    try:
        for epoch in range(2):
            loader.set_epoch(epoch)
            for b in loader:  # no break: the threads stay alive and keep reading
                batches.append((epoch, b))
                consumed = len(batches) if epoch == 0 else None
                if consumed in ks:
                    deadline = time.monotonic() + 10
                    while stream.position < (consumed + 3) * 6 and time.monotonic() < deadline:
                        time.sleep(0.01)
                    read_ahead.append(stream.position - consumed * 6)
                    states.append(json.loads(json.dumps(loader.state_dict())))
    finally:
        loader.close()
    assert all(r >= 18 for r in read_ahead), read_ahead  # the prefetch really was ahead
    assert [s["batch"] for s in states] == list(ks)
    assert [s["stream"]["position"] for s in states] == [k * 6 for k in ks]
    first = [b for e, b in batches if e == 0]
    second = [b for e, b in batches if e == 1]
    assert len(first) == len(loader) == 52 // 6  # manifest counts; the bad one is topped up

    job = {"urls": shards.urls, "stream": skw, "loader": lkw, "states": states,
           "out": str(tmp_path / "resumed.pt")}
    r = subprocess.run([sys.executable, "-c", _RESUME_CHILD], input=json.dumps(job),
                       cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = torch.load(job["out"], weights_only=False)
    for k, (rest, nxt) in zip(ks, resumed, strict=True):
        want = first[k:]
        assert len(rest) == len(want)
        for (keys, labels, v1, v2), b in zip(rest + nxt, want + second[:2], strict=True):
            assert keys == b.keys and torch.equal(labels, b.labels)
            assert torch.equal(v1, b.view1) and torch.equal(v2, b.view2)


@needs_dali
@pytest.mark.timeout(120)
@pytest.mark.parametrize("workers", [0, 1])
def test_pipelined_dali_keeps_parameters_paired_with_their_images(workers):
    """DALI with 2 batches in flight (batch k+1 fed before batch k is collected) gives the
    synchronous executor's batches bit for bit: over an epoch of 4 batches with an
    undecodable JPEG in batch 1 (recovered while batch 2 is in flight, then fed again), and
    over epochs shorter than the depth (1 batch: padded with dropped copies)."""
    from tests.pipelines.augment_helpers import corrupt_entropy_jpeg

    samples = make_samples(32)
    samples[10] = dataclasses.replace(samples[10], image=corrupt_entropy_jpeg(10))
    out = {}
    for depth in (1, 2, 3):
        with TwoViewLoader(FakeStream(samples), RECIPE, batch_size=8, device="cpu",
                           backend="dali", seed=7, pipeline_depth=depth,
                           workers=workers) as loader:
            assert loader._backend.depth == depth
            full = _collect(loader)
            counters = loader.counters
        with TwoViewLoader(FakeStream(samples[:8]), RECIPE, batch_size=8, device="cpu",
                           backend="dali", seed=7, pipeline_depth=depth,
                           workers=workers) as short:
            one = [_collect(short), _collect(short)]  # twice: phantoms must not leak
        out[depth] = (full, one)
        assert len(full) == 4 and counters["aug_backend_errors"] == 1
        assert counters["aug_skipped_corrupt"] == 1
    for depth in (2, 3):
        full, one = out[depth]
        assert all(_same(a, b) for a, b in zip(full, out[1][0], strict=True))
        assert all(_same(a, b) for a, b in zip(one[0] + one[1], out[1][1][0] + out[1][1][1],
                                               strict=True))
