"""Hostile images: bodies that do not decode behind a sound header, and decompression bombs.

Every undecodable sample counts toward `max_bad_fraction`, whether the stream's header
check or the loader's decoder caught it, each under its own counter (reason); a bomb is
refused from its header before anything decodes it.
"""

from __future__ import annotations

import random
import struct
import zlib

import pytest
import webdataset as wds
from PIL import Image
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.shards.stream import BadDataError, ShardStream
from sslstream.pipelines.shards.validate import DEFAULT_MAX_PIXELS, CorruptImage, validate_image
from sslstream.pipelines.views.loader import TwoViewLoader

from tests.fixtures.shards import make_jpeg


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with(width: int, height: int, idat: bytes) -> bytes:
    """A PNG with a valid signature, IHDR, CRCs and IEND around an arbitrary IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat)
            + _chunk(b"IEND", b""))


def noise_png(seed: int) -> bytes:
    """Header fine, CRCs valid, body random: only a decoder can tell."""
    return png_with(16, 16, random.Random(seed).randbytes(300))


def bomb_png() -> bytes:
    """14000 x 14000 px declared (588 MB as RGB), a few hundred bytes on disk."""
    return png_with(14000, 14000, zlib.compress(b"\x00" * 4096))


def _shards(root, images: list[bytes]) -> str:
    root.mkdir(parents=True, exist_ok=True)
    with wds.ShardWriter(str(root / "h-%06d.tar"), maxcount=len(images)) as sink:
        for i, img in enumerate(images):
            ext = "png" if img.startswith(b"\x89PNG") else "jpg"
            sink.write({"__key__": f"k{i:03d}", ext: img, "cls": i % 3})
    return str(root)


def _epoch(loader: TwoViewLoader) -> int:
    n = 0
    for _ in loader:
        n += 1
    return n


def test_noise_png_passes_the_header_check_and_fails_the_decode():
    data = noise_png(1)
    assert validate_image(data, "header").width == 16
    with pytest.raises(CorruptImage) as e:
        validate_image(data, "decode")
    assert e.value.kind == "undecodable"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("limit,expect_error", [(0.01, True), (0.5, False)])
def test_decoder_failures_count_toward_max_bad_fraction(tmp_path, limit, expect_error):
    """25% undecodable PNGs (header fine): replaced in their batches AND counted toward the
    limit -- before, a shard like this trained to the end and was registered."""
    images = [noise_png(i) if i % 4 == 0 else make_jpeg(i) for i in range(32)]
    stream = ShardStream(_shards(tmp_path / "noise", images), shuffle=False, num_workers=0,
                         max_bad_fraction=limit)
    loader = TwoViewLoader(stream, augment_recipe("byol_cifar"), batch_size=8, device="cpu",
                           backend="torchvision", num_threads=1)
    try:
        if expect_error:
            with pytest.raises(BadDataError, match="max_bad_fraction=0.01"):
                _epoch(loader)
        else:
            assert _epoch(loader) == 4
            c = loader.counters
            assert c["undecodable"] == 8
            assert c["skipped_corrupt"] == 8 and c["aug_skipped_corrupt"] == 8
    finally:
        loader.close()


def test_header_caught_images_in_the_loader_count_too(tmp_path):
    """A stream that does not check headers (validate=none): the loader's check catches the
    HTML-as-JPEG and the count reaches the stream's limit under its reason."""
    images = [b"<html>" if i % 8 == 0 else make_jpeg(i) for i in range(16)]
    stream = ShardStream(_shards(tmp_path / "html", images), shuffle=False, num_workers=0,
                         validate="none", max_bad_fraction=0.5)
    loader = TwoViewLoader(stream, augment_recipe("byol_cifar"), batch_size=8, device="cpu",
                           backend="torchvision", num_threads=1)
    try:
        assert loader.validate == "header"
        assert _epoch(loader) == 2
        assert loader.counters["bad_image"] == 2 and loader.counters["skipped_corrupt"] == 2
    finally:
        loader.close()


@pytest.mark.parametrize("validate", ["none", "header", "decode"])
def test_a_bomb_is_skipped_and_counted_before_any_decode(tmp_path, monkeypatch, validate):
    bomb = bomb_png()
    assert len(bomb) < 2000 and DEFAULT_MAX_PIXELS < 14000 * 14000
    opened: list[tuple[int, int]] = []
    real_open = Image.open

    def spy(fp, *a, **kw):
        im = real_open(fp, *a, **kw)
        opened.append(im.size)
        return im

    monkeypatch.setattr(Image, "open", spy)
    images = [make_jpeg(i) for i in range(10)]
    images[4] = bomb
    stream = ShardStream(_shards(tmp_path / f"bomb-{validate}", images), shuffle=False,
                         num_workers=0, validate=validate, max_bad_fraction=0.2)
    keys = [s.key for s in stream]
    assert "k004" not in keys and len(keys) == 10  # topped up by wrap-around
    assert stream.counters["too_many_pixels"] == 1
    # "decode" opens the good JPEGs (and their top-up); never the bomb
    assert (14000, 14000) not in opened
    assert (len(opened) >= 9) if validate == "decode" else not opened
    with pytest.raises(CorruptImage, match="14000x14000") as e:
        validate_image(bomb, validate, DEFAULT_MAX_PIXELS)
    assert e.value.kind == "too_many_pixels"
    validate_image(bomb, "header", None)  # null: no limit (the header itself is sound)


def test_webp_and_jpeg_sizes_from_headers_feed_the_pixel_limit():
    import io

    for fmt, kw in (("WEBP", {}), ("WEBP", {"lossless": True}), ("JPEG", {})):
        out = io.BytesIO()
        Image.new("RGB", (300, 200)).save(out, format=fmt, **kw)
        info = validate_image(out.getvalue(), "header")
        assert (info.width, info.height) == (300, 200)
        with pytest.raises(CorruptImage, match="300x200"):
            validate_image(out.getvalue(), "header", max_pixels=300 * 200 - 1)
        with pytest.raises(CorruptImage, match="300x200"):
            validate_image(out.getvalue(), "none", max_pixels=300 * 200 - 1)


def _mixed_shard(root) -> str:
    """40 samples: 3 HTML-as-JPEG (the stream's header check skips them) and 3 noise PNGs
    (only the loader's decoder rejects them)."""
    images = [make_jpeg(i) for i in range(40)]
    for i in (3, 13, 23):
        images[i] = b"<html>"
    for i in (8, 18, 28):
        images[i] = noise_png(i)
    return _shards(root, images)


def _run(url: str, workers: int, limit: float, epochs: int = 1) -> dict[str, int]:
    stream = ShardStream(url, shuffle=False, num_workers=0, max_bad_fraction=limit)
    loader = TwoViewLoader(stream, augment_recipe("byol_cifar"), batch_size=8, device="cpu",
                           backend="torchvision", num_threads=1, workers=workers)
    try:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            _epoch(loader)
        return loader.counters
    finally:
        loader.close()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 1])
def test_reader_and_decoder_rejections_share_one_limit_with_reader_processes(tmp_path, workers):
    """With a reader process the header check runs there and the decoder here: each side
    alone stays under a 12% limit (4.8 of 40), their sum (>= 6) passes it and must stop the
    epoch, as it does in-process; below the limit the counters are the in-process ones."""
    url = _mixed_shard(tmp_path / "mixed")
    with pytest.raises(BadDataError, match="max_bad_fraction=0.12"):
        _run(url, workers, 0.12)
    assert _run(url, workers, 0.5) == _run(url, 0, 0.5)
    c = _run(url, workers, 0.5)
    assert c["bad_image"] >= 3 and c["undecodable"] == 3
    assert c["skipped_corrupt"] == c["bad_image"] + c["undecodable"]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("workers", [0, 1])
def test_the_bad_sample_limit_is_per_epoch_with_reader_processes(tmp_path, workers):
    """~7 bad of 40 per epoch under a 20% limit (8): three epochs train, as in-process --
    the trainer's copy of the stream must not carry one epoch's count into the next."""
    url = _mixed_shard(tmp_path / "mixed")
    c = _run(url, workers, 0.2, epochs=3)
    assert c["undecodable"] == 9 and c == _run(url, 0, 0.2, epochs=3)
