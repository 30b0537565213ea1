"""The GPU path of the two-view loader. Skipped without CUDA (CI has none): these run on a lent
GPU (`python -m pytest tests/pipelines/test_gpu.py`). The CPU-mode suite checks the same graph's
statistics; test_dali.py checks the GPU graph's op placement without CUDA."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views.loader import TwoViewLoader

from tests.pipelines.augment_helpers import FakeStream, make_samples

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not dali_mod.DALI_AVAILABLE, reason="needs nvidia-dali"),
    pytest.mark.timeout(300),
]


def _recipe(size: int = 64):
    r = augment_recipe("byol_imagenet")
    return dataclasses.replace(r, view1=dataclasses.replace(r.view1, size=size),
                               view2=dataclasses.replace(r.view2, size=size))


def _loader(device, **kw):
    samples = make_samples(64, h=80, w=96)
    kw = {"batch_size": 16, "backend": "dali", "seed": 3, "prefetch": 3, **kw}
    return TwoViewLoader(FakeStream(samples), _recipe(), device=device, **kw)


@pytest.mark.parametrize(("dtype", "channels_last", "spec", "backend"), [
    (torch.bfloat16, True, "last", "dali"), (torch.float32, False, "cuda", "dali"),
    (torch.float16, False, "last", "torchvision")])
def test_gpu_batches_are_on_the_device_and_never_overwritten(dtype, channels_last, spec,
                                                             backend):
    """Every batch is on the loader's device with the asked dtype/layout ("cuda" without an
    index means the current device); tensors kept while the loader produces later batches
    (the trainer holding them on its stream) stay intact."""
    dev = torch.device("cuda", torch.cuda.device_count() - 1 if spec == "last"
                       else torch.cuda.current_device())
    loader = _loader(dev if spec == "last" else "cuda", dtype=dtype, channels_last=channels_last,
                     backend=backend)
    kept = []
    try:
        for b in loader:
            assert b.view1.device == dev and b.labels.device == dev and b.view1.dtype == dtype
            if channels_last:
                assert b.view1.is_contiguous(memory_format=torch.channels_last)
            kept.append((b.view1, b.view2, b.view1.clone(), b.view2.clone()))
            torch.cuda._sleep(5_000_000)  # a long "step" on the trainer's stream
    finally:
        loader.close()
    torch.cuda.synchronize()
    assert len(kept) == 4
    for v1, v2, c1, c2 in kept:
        assert torch.equal(v1, c1) and torch.equal(v2, c2)


def test_gpu_views_match_cpu_mode_statistics():
    """Same seed and parameters: the GPU graph's per-channel mean/std match CPU mode (nvJPEG vs
    libjpeg-turbo decode and GPU filters differ by rounding only)."""
    out = {}
    for name, dev in (("cpu", torch.device("cpu")), ("gpu", torch.device("cuda", 0))):
        loader = _loader(dev)
        try:
            out[name] = [(b.view1.float().cpu(), b.view2.float().cpu(), b.keys) for b in loader]
        finally:
            loader.close()
    for (c1, c2, ck), (g1, g2, gk) in zip(out["cpu"], out["gpu"], strict=True):
        assert ck == gk
        for c, g in ((c1, g1), (c2, g2)):
            assert (c.mean((0, 2, 3)) - g.mean((0, 2, 3))).abs().max() < 0.05
            assert ((c.std((0, 2, 3)) - g.std((0, 2, 3))).abs() / c.std((0, 2, 3))).max() < 0.05
            assert (c - g).abs().mean() < 0.1  # same crops/flips/coins, not just same statistics
