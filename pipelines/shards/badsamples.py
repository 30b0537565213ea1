"""Counting samples a consumer of the stream found unusable, toward `max_bad_fraction`.

Why here and not in the loader: the stream owns the limit (it names the shard when the
limit is passed) and the per-reason counters that reach MLflow; the loader only learns
*after* the stream yielded a sample that its decoder cannot use (a PNG whose IDAT is
noise with valid CRCs, a WebP with a good RIFF header). This one call is all the loader
needs; a stream without `count_bad` (a test double) is left alone.
"""

from __future__ import annotations

from collections.abc import Iterable

from sslstream.pipelines.shards.validate import CorruptImage

__all__ = ["reason_of", "report_bad"]


def reason_of(error: BaseException) -> str:
    """The counter a rejected image goes to: bad_image | too_many_pixels | undecodable."""
    return error.kind if isinstance(error, CorruptImage) else "undecodable"


def report_bad(stream: object, bad: Iterable[tuple[str, str]]) -> None:
    """Count each (reason, shard) with the stream; raises BadDataError past the limit."""
    count = getattr(stream, "count_bad", None)
    if count is None:
        return
    for reason, shard in bad:
        count(reason, shard)
