"""The DALI two-view graph: layouts, events, parity, bad data -- in CPU mode and on the GPU.

Every behavioural test runs twice: `cpu` (device_id=None, CI) and `gpu` (device_id=0,
decode `mixed`), the latter skipped without CUDA, so a lent GPU runs the very same
statistical checks on the GPU graph (`python -m pytest tests/pipelines/test_dali.py`).

Event tests feed images where each event is measurable in the output (a left-to-right ramp
for flips, colour for grayscale, all pixels >= 128 for solarization) and check both the
frequency (binomial, 5 sigma) and that the output shows the event exactly where the host
drew it. Parity tests hold DALI against the torchvision reference fed the same parameters.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views.backend import image_hw
from sslstream.pipelines.views.loader import TwoViewLoader
from sslstream.pipelines.views.recipes import (
    TwoViewRecipe,
    ViewRecipe,
    batch_rng,
    sample_view_params,
)
from sslstream.pipelines.views.reference import TorchvisionTwoView

from tests.pipelines.augment_helpers import (
    FakeStream,
    corrupt_entropy_jpeg,
    encode_jpeg,
    make_samples,
)

NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="the GPU variant needs a CUDA device")
DEVICES = [pytest.param(None, id="cpu"), pytest.param(0, id="gpu", marks=NEEDS_CUDA)]

pytestmark = [
    pytest.mark.dali,
    pytest.mark.skipif(not dali_mod.DALI_AVAILABLE,
                       reason=f"nvidia-dali not importable: {dali_mod.DALI_IMPORT_ERROR}"),
    pytest.mark.timeout(120),
]


def small(recipe: TwoViewRecipe, size: int = 32, **view_overrides) -> TwoViewRecipe:
    def v(view: ViewRecipe) -> ViewRecipe:
        return dataclasses.replace(view, size=size, **view_overrides)

    return TwoViewRecipe(view1=v(recipe.view1), view2=v(recipe.view2), name=recipe.name)


def on_host(views):
    """Backend output -> CPU tensors (a GPU graph's views are CUDA tensors)."""
    return tuple(v.cpu() for v in views)


def loader_device(device_id: int | None) -> str:
    return "cpu" if device_id is None else f"cuda:{device_id}"


def run_graph(recipe: TwoViewRecipe, images: list[bytes], key=(0, 0, 0, 0), *,
              device_id: int | None = None, **spec):
    hw = np.array([image_hw(b, "header") for b in images])
    params = tuple(sample_view_params(v, hw, batch_rng(*key, i)) for i, v in enumerate(recipe.views))
    backend = dali_mod.DaliTwoView(dali_mod.GraphSpec(recipe=recipe, batch_size=len(images),
                                                      device_id=device_id, **spec))
    try:
        views = backend.run(images, params)
        want = "cpu" if device_id is None else "cuda"
        assert all(v.device.type == want for v in views), [v.device for v in views]
        return on_host(views), params
    finally:
        backend.close()


@pytest.mark.parametrize("device_id", DEVICES)
@pytest.mark.parametrize(("dtype", "channels_last"), [
    (torch.float32, False), (torch.float16, False), (torch.bfloat16, True)])
def test_shapes_dtypes_layouts(dtype, channels_last, device_id):
    recipe = small(augment_recipe("byol_cifar"))
    images = [s.image for s in make_samples(6)]
    (v1, v2), _ = run_graph(recipe, images, dtype=dtype, channels_last=channels_last,
                            device_id=device_id)
    for v in (v1, v2):
        assert v.shape == (6, 3, 32, 32) and v.dtype == dtype
        assert torch.isfinite(v.float()).all()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        assert v.is_contiguous(memory_format=fmt)
    assert not torch.equal(v1, v2), "the two views of one image must differ"
    # normalised output: roughly zero-mean, unit-scale values
    assert v1.float().abs().mean() < 3


@pytest.mark.parametrize("device_id", DEVICES)
def test_fp16_is_fp32_rounded(device_id):
    recipe = small(augment_recipe("simclr_cifar"))
    images = [s.image for s in make_samples(4)]
    (a, _), _ = run_graph(recipe, images, dtype=torch.float32, device_id=device_id)
    (b, _), _ = run_graph(recipe, images, dtype=torch.float16, device_id=device_id)
    torch.testing.assert_close(b.float(), a.half().float(), atol=2e-3, rtol=0)


@pytest.mark.parametrize("device_id", DEVICES)
def test_graph_is_a_pure_function_of_its_inputs(device_id):
    recipe = small(augment_recipe("byol_cifar"))
    images = [s.image for s in make_samples(8)]
    (a1, a2), _ = run_graph(recipe, images, key=(0, 0, 0, 0), device_id=device_id)
    (b1, b2), _ = run_graph(recipe, images, key=(0, 0, 0, 0), num_threads=1, device_id=device_id)
    (c1, _), _ = run_graph(recipe, images, key=(1, 0, 0, 0), device_id=device_id)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)  # thread count does not matter
    assert not torch.equal(a1, c1)


def _event_images(n: int) -> list[bytes]:
    """Square coloured images, every pixel >= 140, red ramping up left to right."""
    rng = np.random.default_rng(7)
    xx = np.linspace(0, 1, 32)[None, :]
    out = []
    for _ in range(n):
        img = np.empty((32, 32, 3))
        img[..., 0] = 140 + 110 * xx
        img[..., 1] = rng.uniform(140, 170)
        img[..., 2] = rng.uniform(200, 245)
        out.append(encode_jpeg(np.clip(img, 0, 255).astype(np.uint8), quality=98))
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device_id", DEVICES)
def test_event_frequencies_and_placement_byol(device_id):
    """BYOL at 32 px with the crop pinned to the full image and no jitter: flip 0.5, gray 0.2
    in both views, solarization only in view 2 at 0.2 -- each seen in the pixels."""
    recipe = small(augment_recipe("byol_imagenet"), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), jitter_p=0.0)
    images = _event_images(48)
    spec = dali_mod.GraphSpec(recipe=recipe, batch_size=len(images), device_id=device_id)
    backend = dali_mod.DaliTwoView(spec)
    hw = np.array([image_hw(b, "header") for b in images])
    counts = {(v, e): 0 for v in (0, 1) for e in ("flip", "gray", "sol")}
    n = 0
    try:
        for batch in range(24):
            params = tuple(sample_view_params(v, hw, batch_rng(3, 0, 0, batch, i))
                           for i, v in enumerate(recipe.views))
            outs = on_host(backend.run(images, params))
            for v, (out, p) in enumerate(zip(outs, params, strict=True)):
                mean = torch.tensor(recipe.views[v].mean).view(1, 3, 1, 1)
                std = torch.tensor(recipe.views[v].std).view(1, 3, 1, 1)
                px = (out * std + mean) * 255  # back to 0..255
                sol = px.mean((1, 2, 3)) < 128           # every input pixel was >= 140
                gray = (px[:, 0] - px[:, 2]).abs().mean((1, 2)) < 3
                ramp = px[:, 0, :, -4:].mean((1, 2)) - px[:, 0, :, :4].mean((1, 2))
                flip = (ramp < 0) ^ sol                   # 255 - x reverses the ramp
                for name, seen, drawn in (("flip", flip, p.flip), ("gray", gray, p.grayscale),
                                          ("sol", sol, p.solarize)):
                    assert np.array_equal(seen.numpy(), drawn), f"view {v + 1} {name}"
                    counts[(v, name)] += int(seen.sum())
            n += len(images)
    finally:
        backend.close()
    expected = {(v, "flip"): 0.5 for v in (0, 1)} | {(v, "gray"): 0.2 for v in (0, 1)}
    expected |= {(0, "sol"): 0.0, (1, "sol"): 0.2}
    for key, p in expected.items():
        tol = 5 * math.sqrt(max(p * (1 - p), 1e-12) / n)
        assert abs(counts[key] / n - p) <= tol, (key, counts[key] / n, p)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device_id", DEVICES)
def test_jitter_and_blur_act_exactly_where_drawn(device_id):
    """The conditionals: a sample's output changes when (and only when) its jitter / blur
    coin is on -- compared with the same batch re-run with that coin forced off -- and the
    coins' frequencies are the recipe's (binomial, 5 sigma). BYOL's view 2 (jitter 0.8, blur
    0.1) with sigma pinned to >= 1 so every blur is visible on a textured image."""
    import dataclasses as dc

    base = augment_recipe("byol_imagenet")
    view2 = dc.replace(base.view2, size=32, blur_p=0.5, blur_sigma=(1.0, 2.0))
    recipe = TwoViewRecipe(view1=dc.replace(base.view1, size=32), view2=view2, name="t")
    images = [s.image for s in make_samples(64, h=40, w=40)]
    hw = np.array([image_hw(b, "header") for b in images])
    backend = dali_mod.DaliTwoView(dali_mod.GraphSpec(recipe=recipe, batch_size=len(images),
                                                      device_id=device_id))
    seen = {"jitter": 0, "blur": 0}
    n = 0
    try:
        for batch in range(6):
            p1, p2 = (sample_view_params(v, hw, batch_rng(9, 0, 0, batch, i))
                      for i, v in enumerate(recipe.views))
            _, out = on_host(backend.run(images, (p1, p2)))
            for coin in ("jitter", "blur"):
                off = dc.replace(p2, **{coin: np.zeros_like(getattr(p2, coin))})
                _, ref = on_host(backend.run(images, (p1, off)))
                changed = ((out - ref).abs().amax((1, 2, 3)) > 1e-3).numpy()
                assert np.array_equal(changed, getattr(p2, coin)), coin
                seen[coin] += int(changed.sum())
            n += len(images)
    finally:
        backend.close()
    for coin, p in (("jitter", view2.jitter_p), ("blur", view2.blur_p)):
        assert abs(seen[coin] / n - p) <= 5 * math.sqrt(p * (1 - p) / n), (coin, seen[coin], n)


def _parity(recipe: TwoViewRecipe, n: int = 256, device_id: int | None = None):
    images = [s.image for s in make_samples(n, h=80, w=96)]
    hw = np.array([image_hw(b, "header") for b in images])
    params = tuple(sample_view_params(v, hw, batch_rng(5, 0, 0, 0, i)) for i, v in enumerate(recipe.views))
    dali = dali_mod.DaliTwoView(dali_mod.GraphSpec(recipe=recipe, batch_size=n,
                                                   device_id=device_id))
    ref = TorchvisionTwoView(recipe, num_threads=2)
    try:
        return on_host(dali.run(images, params)), ref.run(images, params)
    finally:
        dali.close()
        ref.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device_id", DEVICES)
def test_geometry_matches_torchvision_pixelwise(device_id):
    """Crop, resize (bilinear, antialiased) and flip: same pixels up to rounding (on the GPU
    also up to nvJPEG's IDCT vs libjpeg-turbo's, fancy upsampling on in both)."""
    recipe = small(augment_recipe("byol_cifar"), jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0)
    (d1, d2), (r1, r2) = _parity(recipe, n=64, device_id=device_id)
    for d, r, view in ((d1, r1, recipe.view1), (d2, r2, recipe.view2)):
        err = (d - r).abs() * torch.tensor(view.std).view(1, 3, 1, 1) * 255  # grey levels
        assert err.mean() < 0.25 and err.max() <= 8, (err.mean(), err.max())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device_id", DEVICES)
@pytest.mark.parametrize(("preset", "hue", "mean_tol", "std_tol"), [
    # Measured (DALI 2.4, torchvision 0.29): without hue |d mean| <= 0.024 (uint8 truncation
    # in torchvision, DALI's contrast centre 128 vs torchvision's mean grey), |d std|/std <=
    # 0.008; with hue (DALI rotates in YIQ, torchvision in HSV) |d mean| <= 0.036 and
    # |d std|/std <= 0.094, on the blue channel.
    ("byol_cifar", 0.0, 0.03, 0.02),
    ("byol_cifar", None, 0.05, 0.12),
    ("byol_imagenet", None, 0.05, 0.12),
])
def test_channel_statistics_match_torchvision(preset, hue, mean_tol, std_tol, device_id):
    """Per-channel mean and std (normalised units) of DALI vs the reference, same inputs and
    parameters, full recipe (jitter, gray, blur, solarize)."""
    extra = {} if hue is None else {"hue": hue}
    recipe = small(augment_recipe(preset), size=32 if preset.endswith("cifar") else 64, **extra)
    (d1, d2), (r1, r2) = _parity(recipe, device_id=device_id)
    for d, r in ((d1, r1), (d2, r2)):
        d, r = d.double(), r.double()
        dm, rm = d.mean((0, 2, 3)), r.mean((0, 2, 3))
        ds, rs = d.std((0, 2, 3)), r.std((0, 2, 3))
        assert (dm - rm).abs().max() <= mean_tol, (dm, rm)
        assert ((ds - rs).abs() / rs).max() <= std_tol, (ds, rs)


def check_undecodable_handled(loader, batches, bad_key: str, n: int, validate: str,
                              device_id: int | None) -> None:
    """Every batch full and one bad JPEG never fatal. validate="decode" drops it on the host
    before DALI sees it. With "header" only, DALI gets it: the CPU decoder (libjpeg-turbo)
    raises, and the loader finds it by a full decode, replaces it and counts a backend error.
    nvJPEG (GPU) may raise likewise or decode the broken entropy data into noise without an
    error, which no header check can tell from a real image: both are accepted there."""
    keys = [k for b in batches for k in b.keys]
    assert len(keys) == n and all(b.view1.shape[0] == batches[0].view1.shape[0] for b in batches)
    c = loader.counters
    if validate == "decode":
        assert bad_key not in keys and c["aug_skipped_corrupt"] == 1, c
        assert c["aug_backend_errors"] == 0, c
    elif device_id is None or c["aug_backend_errors"]:
        assert bad_key not in keys and c["aug_skipped_corrupt"] == 1, c
        assert c["aug_backend_errors"] == 1, c
    else:  # the GPU decoder produced pixels for it: kept, nothing counted
        assert bad_key in keys and c["aug_skipped_corrupt"] == 0, c


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device_id", DEVICES)
def test_undecodable_jpeg_is_replaced_and_counted_not_fatal(device_id):
    """A JPEG with a sound header but a bogus Huffman table passes header validation and
    makes DALI's decoder raise; the loader finds it with a full decode, replaces it by a
    neighbour in the batch and carries on (see `check_undecodable_handled` for the GPU)."""
    samples = make_samples(16)
    bad_key = samples[5].key
    samples[5] = dataclasses.replace(samples[5], image=corrupt_entropy_jpeg(5))
    for validate in ("header", "decode"):
        loader = TwoViewLoader(FakeStream(samples), small(augment_recipe("byol_cifar")), batch_size=8,
                               device=loader_device(device_id), backend="dali",
                               validate=validate)
        try:
            batches = list(loader)
        finally:
            loader.close()
        assert len(batches) == 2
        check_undecodable_handled(loader, batches, bad_key, 16, validate, device_id)


def _graph_ops(pipe):
    """(schema name, device, [(input name, device)], [output devices], op spec) of each op.
    Uses DALI's private `_build_graph` / `_ops` (DALI is pinned to 2.4.0): the graph is
    defined in Python without CUDA, only `build()` needs the GPU."""
    pipe._build_graph()
    out = []
    for op in pipe._ops:
        name = str(op.spec).splitlines()[0].removeprefix("OpSpec for ").rstrip(":")
        device = "cpu"
        for line in str(op.spec).splitlines():
            if line.strip().startswith("device: "):
                device = line.split(": ", 1)[1].strip()
        out.append((name, device, [(i.name, i.device) for i in op.inputs],
                    [o.device for o in op.outputs], op.spec))
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_graph_places_every_op_where_dali_2_4_needs_it(dtype):
    """The GPU variant, checked op by op against DALI's own schemas (no CUDA needed):
    every external_source is CPU (encoded bytes and argument inputs must be host data); the
    decoder is `mixed` (CPU bytes in, GPU image out) with arguments its schema knows and does
    not deprecate; every augmentation op runs on the GPU and takes only CPU argument inputs;
    every conditional split/merge is driven by a CPU BOOL predicate; both outputs are GPU,
    HWC for channels_last, FLOAT16 only where asked (bf16 is cast in torch)."""
    from nvidia.dali import backend as b

    spec = dali_mod.GraphSpec(recipe=augment_recipe("byol_imagenet"), batch_size=4, device_id=0,
                              dtype=dtype, channels_last=True, hw_decoder_load=0.5)
    pipe = dali_mod.define_two_view_pipeline(spec)
    ops = _graph_ops(pipe)
    sources = {n for n, _, ins, _, _ in ops if n == "ExternalSource"}
    assert sources == {"ExternalSource"}
    names = [n for n, *_ in ops]
    assert names.count("ExternalSource") == 1 + 2 * len(dali_mod._PARAM_INPUTS)
    bool_preds = {f"v{v}_{k}" for v in (1, 2) for k, (dt, _) in dali_mod._PARAM_INPUTS.items()
                  if dt == "BOOL"}
    gpu_ops = set(b.RegisteredGPUOps())
    for name, device, ins, outs, op_spec in ops:
        if name == "ExternalSource":
            assert device == "cpu" and outs == ["cpu"], (name, device)
            continue
        if name == "decoders__Image":
            assert device == "mixed" and ins == [("images", "cpu")] and outs == ["gpu"]
            schema = b.GetSchema(name)
            assert "mixed" in schema.GetSupportedBackends()
            for arg in ("hw_decoder_load", "device_memory_padding", "host_memory_padding",
                        "jpeg_fancy_upsampling", "output_type"):
                assert schema.HasArgument(arg) and not schema.IsDeprecatedArg(arg), arg
            assert "hw_decoder_load: 0.5" in str(op_spec)
            continue
        if name in ("_conditional__Split", "_conditional__Merge"):
            pred = ins[-1]
            assert pred[1] == "cpu" and pred[0] in bool_preds, (name, ins)
            continue
        assert device == "gpu" and outs == ["gpu"], (name, device, outs)
        assert name in gpu_ops, name
        data, *args = ins
        assert data[1] == "gpu", (name, ins)
        assert all(dev == "cpu" for _, dev in args), (name, ins)  # argument inputs: host only
    finals = [o for o in ops if o[0] == "CropMirrorNormalize"]
    assert len(finals) == 2 and [o.device for o in pipe._graph_outputs] == ["gpu", "gpu"]
    for *_, op_spec in finals:
        text = str(op_spec)
        assert "output_layout: HWC" in text
        from nvidia.dali import types

        want = types.FLOAT16 if dtype == torch.float16 else types.FLOAT
        assert f"dtype: {int(want)}" in text, text


def test_gpu_eval_graph_decodes_mixed_and_runs_on_the_gpu():
    pipe = dali_mod.define_eval_pipeline(32, 36, (0.5,) * 3, (0.25,) * 3, 4, device_id=0)
    ops = _graph_ops(pipe)
    assert [(n, d) for n, d, *_ in ops] == [("ExternalSource", "cpu"),
                                            ("decoders__Image", "mixed"), ("Resize", "gpu"),
                                            ("CropMirrorNormalize", "gpu")]


@pytest.mark.parametrize("device_id", DEVICES)
def test_outputs_are_owned_buffers_not_recycled_by_the_next_run(device_id):
    """Zero-copy on CPU is safe only because the dynamic executor gives each run() fresh
    buffers (on the GPU `to_torch` copies): keep batch 0's tensors, run 4 more batches,
    batch 0 must be unchanged."""
    recipe = small(augment_recipe("byol_cifar"))
    samples = make_samples(8)
    images = [s.image for s in samples]
    hw = np.array([image_hw(b, "header") for b in images])
    backend = dali_mod.DaliTwoView(dali_mod.GraphSpec(recipe=recipe, batch_size=8,
                                                      device_id=device_id))
    try:
        assert backend._pipe.exec_dynamic
        kept = []
        for k in range(5):
            params = tuple(sample_view_params(v, hw, batch_rng(0, 0, 0, k, i))
                           for i, v in enumerate(recipe.views))
            v1, v2 = backend.run(images, params)
            kept.append((v1, v2, v1.clone(), v2.clone()))
        assert not torch.equal(kept[0][0], kept[1][0])  # different parameters, different views
        for v1, v2, c1, c2 in kept:
            assert torch.equal(v1, c1) and torch.equal(v2, c2)
    finally:
        backend.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device_id", DEVICES)
def test_a_shard_with_corrupt_jpegs_runs_through_with_each_counted(tmp_path, device_id):
    """The whole chain on real shards: a member with a broken header is skipped by the stream
    (`skipped_corrupt`), one that passes the header check but that DALI cannot decode is
    replaced by the loader after a full decode (`aug_skipped_corrupt`, `aug_backend_errors`).
    Every batch is full, every key is a good one."""
    import io
    import tarfile

    from sslstream.pipelines.shards.stream import ShardStream
    from sslstream.pipelines.shards.tools import write_shards

    samples = make_samples(30)
    entropy_key = samples[7].key
    rows = [(s.key, corrupt_entropy_jpeg(7) if s.key == entropy_key else s.image, s.label)
            for s in samples]
    write_shards(rows, tmp_path, max_count=10)
    shard0 = tmp_path / "shard-000000.tar"  # append a member with a broken header
    with tarfile.open(shard0, "a") as tf:
        for name, data in (("zz_bad.jpg", b"\xff\xd8\xff\xe0garbage"), ("zz_bad.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    (tmp_path / "manifest.json").unlink()  # the shard changed: count by reading
    urls = [str(tmp_path / f"shard-00000{i}.tar") for i in range(3)]
    stream = ShardStream(urls, num_workers=2, seed=1, max_bad_fraction=0.1)
    assert len(stream) == 31  # counted by reading: the appended member is listed
    loader = TwoViewLoader(stream, small(augment_recipe("byol_cifar")), batch_size=31,
                           device=loader_device(device_id),
                           backend="dali")  # one batch holding the whole epoch
    try:
        batches = list(loader)
    finally:
        loader.close()
    assert [b.view1.shape[0] for b in batches] == [31]
    keys = {k for b in batches for k in b.keys}
    assert "zz_bad" not in keys
    check_undecodable_handled(loader, batches, entropy_key, 31, "header", device_id)
    c = loader.counters
    # skipped_corrupt counts every bad sample toward max_bad_fraction (issue 12): the broken
    # header (bad_image) plus what the decoder rejected (undecodable; nvJPEG may decode noise)
    assert c["bad_image"] == 1 and c.get("undecodable", 0) == c["aug_skipped_corrupt"], c
    assert c["skipped_corrupt"] == 1 + c.get("undecodable", 0), c
    assert c["topped_up"] == 1  # the stream refilled the broken-header sample's slot


def test_gpu_outputs_are_held_until_their_copy_event_completes(monkeypatch):
    """PendingOutputs' bookkeeping with a fake CUDA event (no GPU here): DALI outputs stay
    referenced until the event recorded after their copy reports done; close drains (waits
    for) the rest; CPU outputs are never held."""
    class FakeEvent:
        made: list = []

        def __init__(self):
            self.done = self.waited = False
            FakeEvent.made.append(self)

        def record(self, stream=None):
            pass

        def query(self):
            return self.done

        def synchronize(self):
            self.waited = True

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    pending = dali_mod.PendingOutputs()
    pending.hold(("cpu",), gpu=False)
    assert len(pending._held) == 0
    pending.hold(("a",), gpu=True)
    pending.hold(("b",), gpu=True)
    assert [o for _, o in pending._held] == [("a",), ("b",)]
    FakeEvent.made[0].done = True
    pending.hold(("c",), gpu=True)  # polls: a's copy is done, b's is not
    assert [o for _, o in pending._held] == [("b",), ("c",)]
    pending.drain()
    assert not pending._held and FakeEvent.made[1].waited and FakeEvent.made[2].waited
    assert not FakeEvent.made[0].waited  # never waited on the host for a finished copy
