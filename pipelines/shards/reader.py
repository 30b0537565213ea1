"""Reading a rank's segments with parallel lanes, merged in a deterministic order.

Why lanes: reading is I/O bound (object stores: latency per GET), so `k` threads each
read their own segments (segment i goes to lane i % k). Their outputs are merged
round-robin by *lane*, one valid sample per turn, never by arrival time: the merged
order depends only on the data, so an epoch replays identically (the resume guarantee)
whatever the thread timing. Problems (corrupt samples, shards ending early) travel in
the same ordered stream as markers, so counting them is deterministic too.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from sslstream.pipelines.shards.cache import ShardCache, open_shard
from sslstream.pipelines.shards.labels import DEFAULT_IMAGE_KEYS, BadLabel, LabelKey, read_label
from sslstream.pipelines.shards.plan import Segment
from sslstream.pipelines.shards.tario import DEFAULT_MAX_MEMBER_BYTES, ShardEnded, iter_tar_samples
from sslstream.pipelines.shards.validate import CorruptImage, validate_image

log = logging.getLogger(__name__)

__all__ = ["Bad", "Good", "Item", "LanePositions", "LaneReader", "SampleSpec", "Short",
           "check_sample"]


@dataclass(frozen=True)
class SampleSpec:
    """How a sample's members are read: image extensions tried in order, the label key
    (resolved: never "auto"), the manifest's class names (for string labels), whether a
    sample without a label is bad (evaluation splits), the pixel limit and the tar
    member size limit (pipelines/shards/tario.py)."""

    image_keys: tuple[str, ...] = DEFAULT_IMAGE_KEYS
    label_key: LabelKey = LabelKey("cls")
    classes: tuple[str, ...] | None = None
    require_label: bool = False
    max_pixels: int | None = None
    max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES


DEFAULT_SPEC = SampleSpec()


@dataclass(frozen=True)
class Good:
    key: str
    image: bytes
    label: int
    shard: str
    padded: bool
    seg: int = -1  # index of the segment in the plan it was read for
    index: int = -1  # sample index inside the shard


@dataclass(frozen=True)
class Bad:
    """A sample skipped as corrupt; `reason` is a counter name."""

    key: str
    shard: str
    reason: str
    detail: str
    seg: int = -1
    index: int = -1


@dataclass(frozen=True)
class Short:
    """A segment ended `lost` samples early (truncated/corrupt shard, or fewer than the manifest)."""

    shard: str
    lost: int
    reason: str
    seg: int = -1
    got: int = 0  # samples of the segment that were read before it ended


Item = Good | Bad | Short


def check_sample(key: str, parts: dict[str, bytes], shard: str, padded: bool,
                 num_classes: int | None, validate: str, seg: int = -1, index: int = -1,
                 spec: SampleSpec = DEFAULT_SPEC) -> Good | Bad:
    """Turn a tar sample into Good or Bad (empty member, missing image, an image past the
    pixel limit or failing the check, bad or -- where required -- missing label)."""
    ext = next((e for e in spec.image_keys if e in parts), None)
    if ext is None:
        return Bad(key, shard, "missing_image",
                   f"members: {sorted(parts)}, image_keys: {list(spec.image_keys)}", seg, index)
    img = parts[ext]
    if not img:
        return Bad(key, shard, "empty", f"{key}.{ext} is empty", seg, index)
    try:
        validate_image(img, validate, spec.max_pixels)
    except CorruptImage as e:
        return Bad(key, shard, e.kind, e.reason, seg, index)
    try:
        label = read_label(parts, spec.label_key, spec.classes)
    except BadLabel as e:
        return Bad(key, shard, "bad_label", f"{key}{e}", seg, index)
    if label is None:
        if spec.require_label:
            return Bad(key, shard, "missing_label",
                       f"{key}: no label under label_key={spec.label_key}", seg, index)
        label = -1
    elif label < 0 or (num_classes is not None and label >= num_classes):
        return Bad(key, shard, "bad_label", f"{key} label {label} outside [0, {num_classes})",
                   seg, index)
    return Good(key, img, label, shard, padded, seg, index)


_END = object()
_CHUNK = 16  # items per queue operation


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class LaneReader:
    """Iterate the items of `segments` of `urls`, read by `lanes` threads (0: inline)."""

    def __init__(self, urls: Sequence[str], segments: Sequence[Segment], *, lanes: int,
                 storage_options: dict | None, num_classes: int | None, validate: str,
                 count: Callable[[str, int], None], queue_size: int = 8,
                 start: LanePositions | None = None, spec: SampleSpec = DEFAULT_SPEC,
                 pool=None, cache: ShardCache | None = None) -> None:
        self.urls, self.segments = urls, list(segments)
        self.threaded = lanes > 0
        self.k = max(1, lanes)
        # Where each lane starts (a resumed epoch) and the order lanes take turns in.
        self.start = start or LanePositions.initial(self.segments, self.k)
        self.so, self.num_classes, self.validate = storage_options, num_classes, validate
        self.count = count
        self.queue_size = queue_size
        self.spec = spec
        self.pool = pool  # lanes.LaneHandle: run the lanes in processes instead of threads
        self.cache = cache  # where object-store shards are kept on local disk (or None)

    def _segment_items(self, si: int, first: int,
                       stop: Callable[[], bool] | None = None) -> Iterator[Item]:
        """Items of segment `si` from sample index `first` (>= its start) on; `stop()`
        ends a read in progress (tario.Stopped) when the consumer has gone."""
        seg = self.segments[si]
        url = self.urls[seg.shard]
        self.count("shards_opened", 1)
        i = -1
        with open_shard(url, self.so, cache=self.cache, count=self.count,
                        on_retry=lambda e: self.count("retries", 1)) as f:
            try:
                samples = iter_tar_samples(f, max_member_bytes=self.spec.max_member_bytes,
                                           stop=stop)
                for i, (key, parts) in enumerate(samples):  # noqa: B007
                    if i < first:
                        continue
                    if i >= seg.stop:
                        return  # leave the rest of the shard unread
                    self.count("read", 1)
                    yield check_sample(key, parts, url, seg.padded, self.num_classes,
                                       self.validate, si, i, self.spec)
            except ShardEnded as e:
                got = max(0, min(e.samples, seg.stop) - seg.start)
                yield Short(url, len(seg) - got, e.reason, si, got)
                return
        got = max(0, min(i + 1, seg.stop) - seg.start)
        if got < len(seg):
            yield Short(url, len(seg) - got, f"shard has {i + 1} samples, fewer than listed", si, got)

    def _lane_items(self, lane: int, stop: Callable[[], bool] | None = None) -> Iterator[Item]:
        mine = list(range(lane, len(self.segments), self.k))
        q, first = self.start.pos.get(lane, (len(mine), 0))
        for n in range(q, len(mine)):
            si = mine[n]
            yield from self._segment_items(si, first if n == q else self.segments[si].start,
                                           stop)

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

        gen = self._lane_items(lane, stop.is_set)
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
            yield from self._merge({j: self._lane_items(j) for j in self.start.turns})
            return
        if self.pool is not None:
            yield from self._pooled()
            return
        stop = threading.Event()
        qs = {j: queue.Queue(self.queue_size) for j in self.start.turns}
        threads = [threading.Thread(target=self._run_lane, args=(j, qs[j], stop), daemon=True,
                                    name=f"sslstream-lane{j}") for j in qs]
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
            yield from self._merge({j: drain(q) for j, q in qs.items()})
        finally:
            stop.set()
            for q in qs.values():  # unblock producers waiting on a full queue
                with contextlib.suppress(queue.Empty):
                    while True:
                        q.get_nowait()
            for t in threads:
                t.join(timeout=30)

    def _pooled(self) -> Iterator[Item]:
        """The same lanes and merge, each lane read by a lane process (pipelines/shards/lanes.py)."""
        pool = self.pool
        job = pool.next_job()
        spec = {"urls": list(self.urls), "segments": self.segments, "k": self.k,
                "sample_spec": self.spec,
                "storage_options": self.so, "num_classes": self.num_classes,
                "validate": self.validate, "start": self.start, "cache": self.cache}
        pool.submit(job, spec, list(self.start.turns))
        try:
            yield from self._merge({j: pool.items(job, j, self.count) for j in self.start.turns})
        finally:
            pool.cancel(job)

    def _merge(self, lanes: dict[int, Iterator[Item]]) -> Iterator[Item]:
        """Round-robin by lane: each turn passes markers through until one Good sample; a
        lane that ends leaves the rotation (pipelines.shards.resume simulates exactly this)."""
        turns = collections.deque(self.start.turns)
        while turns:
            j = turns.popleft()
            for item in lanes[j]:
                yield item
                if isinstance(item, Good):
                    turns.append(j)
                    break


@dataclass
class LanePositions:
    """Where each lane is: pos[lane] = (n-th of the lane's segments, next sample index),
    and `turns`, the lanes still reading in the order they will take turns."""

    pos: dict[int, tuple[int, int]]
    turns: list[int]

    @classmethod
    def initial(cls, segments: Sequence[Segment], k: int) -> LanePositions:
        lanes = [j for j in range(k) if j < len(segments)]
        return cls({j: (0, segments[j].start) for j in lanes}, lanes)
