"""Write ImageNet-sized JPEG shards (default 500x375, quality 90) for the throughput benchmark.

The images are procedural (smooth colour fields, blobs, edges and noise, so JPEG sizes and
decode costs resemble photographs: ~55 kB at 500x375, quality 90), written with the project's own
`sslstream.pipelines.shards.tools.write_shards`, so the benchmark reads exactly what training reads.

    python benchmarks/make_large_jpeg_shards.py OUT_DIR --count 2048 --width 500 --height 375
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator

import numpy as np
from PIL import Image


def photo_like(seed: int, width: int, height: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.zeros((height, width, 3), np.float32)
    for c in range(3):  # low-frequency colour field
        fx, fy, ph = rng.uniform(0.5, 3.0), rng.uniform(0.5, 3.0), rng.uniform(0, 6.3)
        img[..., c] = 128 + 90 * np.sin(fx * xx / width * np.pi + ph) * np.cos(fy * yy / height * np.pi)
    for _ in range(6):  # blobs and hard edges (objects)
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(10, height / 3)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
        img[mask] = img[mask] * 0.4 + rng.uniform(0, 255, 3) * 0.6
    img += rng.normal(0, 8, img.shape).astype(np.float32)  # texture
    return np.clip(img, 0, 255).astype(np.uint8)


def samples(count: int, width: int, height: int, quality: int,
            num_classes: int) -> Iterator[tuple[str, bytes, int]]:
    for i in range(count):
        buf = io.BytesIO()
        Image.fromarray(photo_like(i, width, height)).save(buf, format="JPEG", quality=quality)
        yield f"img{i:07d}", buf.getvalue(), i % num_classes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    ap.add_argument("--count", type=int, default=2048)
    ap.add_argument("--width", type=int, default=500)
    ap.add_argument("--height", type=int, default=375)
    ap.add_argument("--quality", type=int, default=90)
    ap.add_argument("--per-shard", type=int, default=512)
    ap.add_argument("--num-classes", type=int, default=10)
    a = ap.parse_args(argv)
    from sslstream.pipelines.shards.tools import write_shards

    manifest = write_shards(samples(a.count, a.width, a.height, a.quality, a.num_classes),
                            a.out_dir, prefix="large", max_count=a.per_shard,
                            classes=[f"c{i}" for i in range(a.num_classes)])
    print(f"wrote {a.count} JPEGs ({a.width}x{a.height}) to {a.out_dir}: {manifest!r:.200}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
