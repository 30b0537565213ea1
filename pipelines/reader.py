"""Reading a rank's segments with parallel lanes, merged in a deterministic order.

Why lanes: reading is I/O bound (object stores: latency per GET), so `k` threads each
read their own segments (segment i goes to lane i % k). Their outputs are merged
round-robin by *lane*, one valid sample per turn, never by arrival time: the merged
order depends only on the data, so an epoch replays identically (the resume guarantee)
whatever the thread timing. Problems (corrupt samples, shards ending early) travel in
the same ordered stream as markers, so counting them is deterministic too.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from pipelines.plan import Segment
from pipelines.storage import open_reader
from pipelines.tario import IMAGE_EXTS, ShardEnded, iter_tar_samples
from pipelines.validate import CorruptImage, validate_image

log = logging.getLogger(__name__)

__all__ = ["Bad", "Item", "LaneReader", "Short", "Good", "check_sample"]


@dataclass(frozen=True)
class Good:
    key: str
    image: bytes
    label: int
    shard: str
    padded: bool


@dataclass(frozen=True)
class Bad:
    """A sample skipped as corrupt; `reason` is a counter name."""

    key: str
    shard: str
    reason: str
    detail: str


@dataclass(frozen=True)
class Short:
    """A segment ended `lost` samples early (truncated/corrupt shard, or fewer than the manifest)."""

    shard: str
    lost: int
    reason: str


Item = Good | Bad | Short


def check_sample(key: str, parts: dict[str, bytes], shard: str, padded: bool,
                 num_classes: int | None, validate: str) -> Good | Bad:
    """Turn a tar sample into Good or Bad (empty member, missing image, bad image/label)."""
    ext = next((e for e in IMAGE_EXTS if e in parts), None)
    if ext is None:
        return Bad(key, shard, "missing_image", f"members: {sorted(parts)}")
    img = parts[ext]
    if not img:
        return Bad(key, shard, "empty", f"{key}.{ext} is empty")
    try:
        validate_image(img, validate)
    except CorruptImage as e:
        return Bad(key, shard, "bad_image", e.reason)
    label = -1
    if "cls" in parts:
        try:
            label = int(parts["cls"].decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return Bad(key, shard, "bad_label", f"{key}.cls = {parts['cls'][:20]!r}")
        if label < 0 or (num_classes is not None and label >= num_classes):
            return Bad(key, shard, "bad_label", f"{key}.cls = {label} outside [0, {num_classes})")
    return Good(key, img, label, shard, padded)


_END = object()
_CHUNK = 16  # items per queue operation


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class LaneReader:
    """Iterate the items of `segments` of `urls`, read by `lanes` threads (0: inline)."""

    def __init__(self, urls: Sequence[str], segments: Sequence[Segment], *, lanes: int,
                 storage_options: dict | None, num_classes: int | None, validate: str,
                 count: Callable[[str, int], None], queue_size: int = 8) -> None:
        self.urls, self.segments = urls, list(segments)
        self.threaded = lanes > 0
        self.k = max(1, lanes)
        self.so, self.num_classes, self.validate = storage_options, num_classes, validate
        self.count = count
        self.queue_size = queue_size

    def _segment_items(self, seg: Segment) -> Iterator[Item]:
        url = self.urls[seg.shard]
        self.count("shards_opened", 1)
        i = -1
        with open_reader(url, self.so, on_retry=lambda e: self.count("retries", 1)) as f:
            try:
                for i, (key, parts) in enumerate(iter_tar_samples(f)):  # noqa: B007
                    if i < seg.start:
                        continue
                    if i >= seg.stop:
                        return  # leave the rest of the shard unread
                    self.count("read", 1)
                    yield check_sample(key, parts, url, seg.padded, self.num_classes, self.validate)
            except ShardEnded as e:
                got = max(0, min(e.samples, seg.stop) - seg.start)
                yield Short(url, len(seg) - got, e.reason)
                return
        got = max(0, min(i + 1, seg.stop) - seg.start)
        if got < len(seg):
            yield Short(url, len(seg) - got, f"shard has {i + 1} samples, fewer than listed")

    def _lane_items(self, lane: int) -> Iterator[Item]:
        for seg in self.segments[lane :: self.k]:
            yield from self._segment_items(seg)

    def _run_lane(self, lane: int, q: queue.Queue, stop: threading.Event) -> None:
        """Producer thread: items go to the queue in chunks (one queue operation per chunk,
        not per sample: for small images the queue's locking was a visible cost)."""
        def put(x: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(x, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        gen = self._lane_items(lane)
        chunk: list[Item] = []
        try:
            for item in gen:
                chunk.append(item)
                if len(chunk) >= _CHUNK:
                    if not put(chunk):
                        return
                    chunk = []
            if (chunk and not put(chunk)) or not put(_END):
                return
        except BaseException as e:  # surfaced in the consumer's thread, after what was read
            if chunk:
                put(chunk)
            put(_Failure(e))
        finally:
            gen.close()

    def __iter__(self) -> Iterator[Item]:
        if not self.threaded:
            yield from self._merge([self._lane_items(j) for j in range(self.k)])
            return
        stop = threading.Event()
        qs = [queue.Queue(self.queue_size) for _ in range(self.k)]
        threads = [threading.Thread(target=self._run_lane, args=(j, qs[j], stop), daemon=True,
                                    name=f"sslstream-lane{j}") for j in range(self.k)]
        for t in threads:
            t.start()

        def drain(q: queue.Queue) -> Iterator[Item]:
            while True:
                x = q.get()
                if x is _END:
                    return
                if isinstance(x, _Failure):
                    raise x.exc
                yield from x

        try:
            yield from self._merge([drain(q) for q in qs])
        finally:
            stop.set()
            for q in qs:  # unblock producers waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    while True:
                        q.get_nowait()
            for t in threads:
                t.join(timeout=30)

    @staticmethod
    def _merge(lanes: list[Iterator[Item]]) -> Iterator[Item]:
        """Round-robin by lane: each turn passes markers through until one Good sample."""
        active = list(lanes)
        while active:
            nxt = []
            for it in active:
                for item in it:
                    yield item
                    if isinstance(item, Good):
                        nxt.append(it)
                        break
            active = nxt
