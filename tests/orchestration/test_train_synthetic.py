"""The embedded default data set: deterministic, labelled, atomic, readable as shards."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sslstream.pipelines.shards import synthetic


def test_samples_are_deterministic_balanced_jpegs():
    a = list(synthetic.samples(30, size=24, seed=1))
    b = list(synthetic.samples(30, size=24, seed=1))
    c = list(synthetic.samples(30, size=24, seed=2))
    assert a == b and a != c
    labels = [lab for _, _, lab in a]
    assert sorted(set(labels)) == list(range(10)) and labels.count(0) == 3
    img = Image.open(io.BytesIO(a[0][1]))
    assert img.format == "JPEG" and img.size == (24, 24) and img.mode == "RGB"


def test_foreground_hue_follows_the_class():
    """The documented colour cue: the most saturated pixels' hue is within +-0.1 of a turn
    of label/10 (class hue +-0.05, plus JPEG-free pixel noise)."""
    import colorsys

    rng = np.random.default_rng(0)
    for label in range(10):
        for _ in range(5):
            arr = np.asarray(synthetic.draw(label, 32, rng), dtype=np.float32) / 255.0
            px = arr.reshape(-1, 3)
            hsv = np.array([colorsys.rgb_to_hsv(*p) for p in px])
            top = hsv[np.argsort(hsv[:, 1] * hsv[:, 2])[-20:], 0]  # vivid pixels: the shape
            hue = np.angle(np.exp(2j * np.pi * top).mean()) / (2 * np.pi) % 1.0
            d = abs((hue - label / 10 + 0.5) % 1.0 - 0.5)
            assert d < 0.1, (label, hue)


def test_ensure_synthetic_is_atomic_and_idempotent(tmp_path, monkeypatch):
    root = tmp_path / "data" / "synthetic"
    out = synthetic.ensure_synthetic(root, train_samples=40, test_samples=20, image_size=16, samples_per_shard=16)
    assert out == root.resolve() and synthetic.is_complete(root)
    first = sorted(p.name for p in (root / "train").iterdir())
    assert first == ["manifest.json", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]
    mtime = (root / "train" / "manifest.json").stat().st_mtime_ns
    synthetic.ensure_synthetic(root, train_samples=40, test_samples=20, image_size=16)
    assert (root / "train" / "manifest.json").stat().st_mtime_ns == mtime  # not regenerated

    # a crash mid-generation leaves nothing under root and no temp dir behind
    import sslstream.pipelines.shards.tools as shards

    def boom(*a, **k):
        raise OSError("disk full")

    other = tmp_path / "other"
    monkeypatch.setattr(shards, "write_shards", boom)
    with pytest.raises(OSError, match="disk full"):
        synthetic.ensure_synthetic(other, train_samples=10, test_samples=10)
    assert not other.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_refuses_incomplete_non_empty_root(tmp_path):
    (tmp_path / "junk.txt").write_text("x")
    with pytest.raises(FileExistsError, match="data.root"):
        synthetic.ensure_synthetic(tmp_path, train_samples=10, test_samples=10)


def test_stream_reads_generated_shards(tmp_path):
    from sslstream.pipelines.shards.stream import ShardStream

    root = synthetic.ensure_synthetic(tmp_path / "s", train_samples=30, test_samples=10, image_size=16, samples_per_shard=8)
    got = list(ShardStream(str(root / "train"), shuffle=False, num_workers=1, exact_epoch=True))
    assert len(got) == 30
    assert sorted(s.label for s in got) == sorted(i % 10 for i in range(30))
