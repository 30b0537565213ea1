"""Reading WebDataset tar shards as a stream of (key, {ext: bytes}) groups.

Why not webdataset's tar iterator: we need to know *how* a shard ended (cleanly, or cut
short / corrupt after n samples) to keep what was read, count the loss and still fail
loudly on storage errors; webdataset folds all of that into one handler callback.
Grouping follows webdataset's convention: a sample is a run of consecutive members
sharing the path up to the first dot of the file name.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from collections.abc import Iterator
from typing import IO

from pipelines.storage import StorageError

__all__ = ["IMAGE_EXTS", "ShardEnded", "iter_tar_samples", "split_key"]

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class ShardEnded(Exception):
    """The shard's data ended early or became unreadable after `samples` complete samples."""

    def __init__(self, reason: str, samples: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.samples = samples


def split_key(name: str) -> tuple[str, str] | None:
    """('dir/key', 'ext') for a member name, None for names without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def iter_tar_samples(f: IO[bytes]) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, parts) per sample; raise ShardEnded if the stream breaks.

    The sample being assembled when the data breaks is dropped (it may lack parts).
    StorageError (permanent storage failure) propagates unchanged.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    n = 0
    try:
        with tarfile.open(fileobj=f, mode="r|*") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                kx = split_key(member.name)
                if kx is None:
                    continue
                fo = tf.extractfile(member)
                data = fo.read() if fo is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} cut short")
                if kx[0] != key:
                    if key is not None:
                        n += 1
                        yield key, parts
                    key, parts = kx[0], {}
                parts[kx[1]] = data
    except StorageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ShardEnded(f"{type(e).__name__}: {e}", n) from None
    if key is not None:
        yield key, parts
