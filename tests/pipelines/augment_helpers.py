"""Images and a list-backed stream for the augmentation tests (no shards, no threads)."""

from __future__ import annotations

import io
import time
from collections.abc import Generator

import numpy as np
from PIL import Image
from sslstream.pipelines.shards.stream import Sample


def pattern_image(seed: int, h: int, w: int) -> np.ndarray:
    """A natural-ish uint8 RGB image: smooth colour ramps, a blob, mild noise (distinct per seed)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    a, b, c = rng.uniform(0.5, 2.0, 3)
    cy, cx = rng.uniform(0, h), rng.uniform(0, w)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.1 * h * w))
    img = np.stack([
        128 + 100 * np.sin(a * xx / w * np.pi + rng.uniform(0, 6)),
        128 + 100 * np.cos(b * yy / h * np.pi + rng.uniform(0, 6)),
        60 + 150 * blob + 30 * np.sin(c * (xx + yy) / (h + w) * np.pi),
    ], axis=-1)
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    out = io.BytesIO()
    Image.fromarray(img).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pattern_jpeg(seed: int, h: int = 40, w: int = 48) -> bytes:
    return encode_jpeg(pattern_image(seed, h, w))


def corrupt_entropy_jpeg(seed: int) -> bytes:
    """A JPEG whose markers and header are sound but whose Huffman table is bogus:
    header validation passes it, every decoder (PIL, libjpeg in DALI) rejects it."""
    data = bytearray(pattern_jpeg(seed))
    dht = data.find(b"\xff\xc4")
    data[dht + 5 : dht + 21] = b"\xff" * 16
    return bytes(data)


def make_samples(n: int, *, h: int = 40, w: int = 48, shard: str = "mem://0") -> list[Sample]:
    return [Sample(f"s{i:05d}", pattern_jpeg(i, h + i % 5, w - i % 7), i, shard) for i in range(n)]


class FakeStream:
    """A `SampleStream` over a list: the epoch permutes the order (seeded), the cursor is the
    position within the epoch, `delay_s` simulates slow storage per sample. Bad samples a
    consumer reports are counted (`count_bad`, `set_external_bad`); no limit applies."""

    validate = "none"  # the loader checks the headers itself
    partition = False  # the whole list, on every rank
    num_workers = 0
    lane_pool = None

    def __init__(self, samples: list[Sample], *, seed: int = 0, delay_s: float = 0.0,
                 rank: int = 0, world_size: int = 1) -> None:
        self.samples, self.seed, self.delay_s = samples, seed, delay_s
        self.rank, self.world_size = rank, world_size
        self.epoch, self.position = 0, 0
        self.counters = {"read": 0}
        self.reported: list[tuple[str, str]] = []  # (reason, shard) per count_bad
        self.external_bad = 0

    @property
    def epoch_bad(self) -> int:
        return len(self.reported) + self.external_bad

    def count_bad(self, reason: str, shard: str, n: int = 1) -> None:
        self.reported += [(reason, shard)] * n

    def set_external_bad(self, n: int, shard: str) -> None:
        self.external_bad = n

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def state_dict(self, position: int | None = None) -> dict:
        return {"epoch": self.epoch, "position": self.position if position is None else position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]

    def __iter__(self) -> Generator[Sample, None, None]:
        if self.position >= len(self):
            self.position = 0
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
        for j in order[self.position :]:
            if self.delay_s:
                time.sleep(self.delay_s)
            self.position += 1
            self.counters["read"] += 1
            yield self.samples[j]
