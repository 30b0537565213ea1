"""What the shard stream yields and reports: a `Sample`, its counters, `BadDataError`.

Plain data types that a stream's producers and consumers share: the reader builds
`Sample`s, the loaders consume them, every counter has its name here, and `BadDataError`
carries the shard where the bad-sample limit was passed. stream.py re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["BAD_REASONS", "COUNTER_NAMES", "BadDataError", "Sample", "sample_options"]

COUNTER_NAMES = (
    "read", "yielded", "skipped_corrupt", "bad_image", "empty", "missing_image", "bad_label",
    "missing_label", "too_many_pixels", "undecodable",
    "truncated_shards", "lost", "padded", "topped_up", "retries", "shards_opened", "replayed",
    "fast_forwarded", "refetched",
    # the local shard cache (pipelines/shards/cache.py)
    "cache_hits", "cache_fetched", "cache_fetched_bytes", "cache_corrupt", "cache_evicted",
    "cache_streamed", "cache_waited",
)


# the counters that count a skipped sample, in the order an error message lists them
BAD_REASONS = ("bad_image", "too_many_pixels", "undecodable", "empty", "missing_image",
               "bad_label", "missing_label", "lost")


@dataclass(frozen=True)
class Sample:
    key: str
    image: bytes  # encoded image (JPEG/PNG/WebP), already header-validated
    label: int  # -1 when the shard has no label
    shard: str  # URL of the shard it came from
    # position in the listed shard order (shard's start + index inside it): a sample's
    # identity whatever the rank split (evaluation breaks kNN ties by it); -1 if unknown
    index: int = -1


def sample_options(data: Any, *, labelled: bool = False) -> dict:
    """ShardStream keyword arguments from the ``data`` config section (label_key, image_keys,
    max_pixels, max_member_bytes: every key set, orchestration/schema/data.py); ``labelled``:
    an evaluation split, whose samples must carry a label."""
    return {"label_key": str(data.label_key), "image_keys": [str(k) for k in data.image_keys],
            "max_pixels": data.max_pixels, "require_label": labelled,
            "max_member_bytes": int(data.max_member_bytes)}


class BadDataError(RuntimeError):
    """Too much of the data is corrupt or missing; `shard` is where the limit was passed."""

    def __init__(self, message: str, shard: str) -> None:
        super().__init__(message)
        self.shard = shard
