"""Counting samples a consumer of the stream found unusable, toward `max_bad_fraction`.

The stream owns the limit (it names the shard when the limit is passed) and the per-reason
counters that reach MLflow; a consumer learns only *after* the stream yielded a sample that
its decoder cannot use (a PNG whose IDAT is noise with valid CRCs, a WebP with a good RIFF
header). These two functions turn such a rejection into the stream's counter name and
report it (`SampleStream.count_bad`).
"""

from __future__ import annotations

from collections.abc import Iterable

from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.shards.validate import CorruptImage

__all__ = ["reason_of", "report_bad"]


def reason_of(error: BaseException) -> str:
    """The counter a rejected image goes to: bad_image | too_many_pixels | undecodable."""
    return error.kind if isinstance(error, CorruptImage) else "undecodable"


def report_bad(stream: SampleStream, bad: Iterable[tuple[str, str]]) -> None:
    """Count each (reason, shard) with the stream; raises BadDataError past the limit."""
    for reason, shard in bad:
        stream.count_bad(reason, shard)
