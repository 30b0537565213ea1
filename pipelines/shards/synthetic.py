"""The embedded default data set: procedural, labelled, synthetic images.

`sslstream train` with no arguments must work on a fresh machine with no download, so the
default data set is drawn here: 10 classes, one per shape (disc, square, triangle, cross,
ring, horizontal bars, vertical bars, checkerboard, diagonal bar, diamond), each drawn at a
random position, scale and rotation, with pixel noise on a dim random background, saved
as small JPEGs in WebDataset shards. The shape's hue sits near a per-class hue (`_colours`),
a weak colour cue: without it 600 CPU steps of BYOL barely move kNN (0.18 -> 0.23 on a
random-colour variant), with it a random encoder already scores ~0.73 and training reaches
~0.80 (BENCHMARKS.md). A texture-class variant with random colours (stripes by
orientation, checker, dots, rings, grid, disc, triangle) was tried too: 0.33 kNN at init,
0.33 after the full 600 steps (no gain), so not kept. It is a smoke-test-sized data set, not a
benchmark: numbers on it say the system works end to end, not how good a method is.

Generation is deterministic for a seed and atomic: the shards are written into a temporary
sibling directory and renamed into place, so a crash never leaves a half-written data set
that later runs would mistake for a complete one.
"""

from __future__ import annotations

import colorsys
import io
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

CLASSES = (
    "disc",
    "square",
    "triangle",
    "cross",
    "ring",
    "hbars",
    "vbars",
    "checker",
    "diagonal",
    "diamond",
)


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _colours(rng: np.random.Generator, label: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Foreground hue near the class's own hue (10 hues 36 degrees apart, +-18 degrees of
    noise), random saturation and value; a dim, desaturated random background.

    Colour is a weak class cue on purpose: the synthetic set must be learnable in a few
    minutes of CPU training, and SSL colour jitter (hue +-36 degrees) blurs neighbouring
    classes' hues, so shape still decides between them.
    """
    hue = (label / len(CLASSES) + rng.uniform(-0.05, 0.05)) % 1.0
    fg = colorsys.hsv_to_rgb(hue, rng.uniform(0.5, 1.0), rng.uniform(0.6, 1.0))
    bg = colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.4), rng.uniform(0.05, 0.45))
    return tuple(int(255 * c) for c in fg), tuple(int(255 * c) for c in bg)  # type: ignore[return-value]


def draw(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of class `label` (index into CLASSES)."""
    if not 0 <= label < len(CLASSES):
        raise ValueError(f"label must be in [0, {len(CLASSES)}), got {label}")
    ss = 4  # draw 4x larger and downsample: anti-aliased edges, like a photo of a shape
    big = size * ss
    fg, bg = _colours(rng, label)
    img = Image.new("RGB", (big, big), bg)
    d = ImageDraw.Draw(img)
    r = big * rng.uniform(0.22, 0.4)  # half-extent of the shape
    cx = rng.uniform(r, big - r)
    cy = rng.uniform(r, big - r)
    ang = rng.uniform(0, 2 * math.pi)
    name = CLASSES[label]
    if name == "disc":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif name == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=max(2, int(r * 0.3)))
    elif name in ("square", "diamond", "triangle", "cross", "diagonal"):
        if name == "square":
            pts = [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
            d.polygon(_rotate(pts, cx, cy, rng.uniform(-0.3, 0.3)), fill=fg)
        elif name == "diamond":
            pts = [(cx, cy - r), (cx + 0.6 * r, cy), (cx, cy + r), (cx - 0.6 * r, cy)]
            d.polygon(_rotate(pts, cx, cy, rng.uniform(-0.3, 0.3)), fill=fg)
        elif name == "triangle":
            pts = [(cx + r * math.cos(ang + k * 2 * math.pi / 3), cy + r * math.sin(ang + k * 2 * math.pi / 3)) for k in range(3)]
            d.polygon(pts, fill=fg)
        elif name == "cross":
            w = r * 0.3
            for pts in (
                [(cx - r, cy - w), (cx + r, cy - w), (cx + r, cy + w), (cx - r, cy + w)],
                [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy + r), (cx - w, cy + r)],
            ):
                d.polygon(_rotate(pts, cx, cy, ang % (math.pi / 2)), fill=fg)
        else:  # diagonal: one thick bar at 45 degrees (+- jitter), either direction
            w = r * 0.3
            pts = [(cx - r * 1.4, cy - w), (cx + r * 1.4, cy - w), (cx + r * 1.4, cy + w), (cx - r * 1.4, cy + w)]
            tilt = math.pi / 4 * (1 if rng.random() < 0.5 else -1) + rng.uniform(-0.2, 0.2)
            d.polygon(_rotate(pts, cx, cy, tilt), fill=fg)
    elif name in ("hbars", "vbars"):
        period = big * rng.uniform(0.15, 0.3)
        off = rng.uniform(0, period)
        pos = -period + off
        while pos < big:
            if name == "hbars":
                d.rectangle([0, pos, big, pos + period / 2], fill=fg)
            else:
                d.rectangle([pos, 0, pos + period / 2, big], fill=fg)
            pos += period
    elif name == "checker":
        cell = big * rng.uniform(0.15, 0.3)
        ox, oy = rng.uniform(0, cell, 2)
        n = int(big / cell) + 2
        for i in range(-1, n):
            for j in range(-1, n):
                if (i + j) % 2 == 0:
                    x0, y0 = ox + i * cell, oy + j * cell
                    d.rectangle([x0, y0, x0 + cell, y0 + cell], fill=fg)
    img = img.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0.0, rng.uniform(4.0, 16.0), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def samples(n: int, *, size: int = 32, seed: int = 0, split: str = "train", quality: int = 90) -> Iterator[tuple[str, bytes, int]]:
    """`n` (key, jpeg bytes, label) samples, classes balanced round-robin, deterministic in seed."""
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    for i in range(n):
        label = i % len(CLASSES)
        buf = io.BytesIO()
        draw(label, size, rng).save(buf, format="JPEG", quality=quality)
        yield f"{split}-{i:07d}", buf.getvalue(), label


def is_complete(root: str | Path) -> bool:
    """True when `root` holds the train and test shard folders with their manifests."""
    r = Path(root)
    return (r / "train" / "manifest.json").is_file() and (r / "test" / "manifest.json").is_file()


def ensure_synthetic(
    root: str | Path,
    *,
    train_samples: int = 2560,
    test_samples: int = 512,
    image_size: int = 32,
    seed: int = 0,
    samples_per_shard: int = 512,
) -> Path:
    """Generate the data set under `root` (train/ and test/ shard folders) unless present.

    Atomic: written to a temporary sibling directory, then renamed onto `root`. When two
    processes race (several ranks on one shared disk), the loser's copy is discarded.
    """
    from sslstream.pipelines.shards.tools import write_shards  # the shard writer of this project

    r = Path(root).expanduser().resolve()
    if is_complete(r):
        return r
    if r.exists() and any(r.iterdir()):
        raise FileExistsError(
            f"data.root={r} exists but is not a complete synthetic data set "
            "(train/manifest.json and test/manifest.json); remove it or point data.root elsewhere"
        )
    r.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{r.name}-tmp-", dir=r.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the data set is not secret
    try:
        for split, n in (("train", train_samples), ("test", test_samples)):
            write_shards(
                samples(n, size=image_size, seed=seed, split=split),
                tmp / split,
                prefix=split,
                max_count=samples_per_shard,
                classes=list(CLASSES),
            )
        _write_readme(tmp, train_samples, test_samples, image_size, seed)
        if r.exists():
            r.rmdir()  # empty directory left by someone: replace it
        os.rename(tmp, r)
    except OSError:
        if is_complete(r):  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return r
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return r


def _write_readme(d: Path, n_train: int, n_test: int, size: int, seed: int) -> None:
    (d / "README.txt").write_text(
        "Synthetic data set generated by sslstream (pipelines/shards/synthetic.py).\n"
        f"{len(CLASSES)} classes by shape: {', '.join(CLASSES)}.\n"
        f"train: {n_train} samples, test: {n_test} samples, {size}x{size} JPEG, seed {seed}.\n"
        "Procedural images: random position, scale, rotation, colours and noise. Not real data.\n"
    )
