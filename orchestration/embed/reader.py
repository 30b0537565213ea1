"""Reading a rank's parts through the training data plane, ahead of the encoder.

`PartStream` yields the samples of its parts, part after part; each part is one
`ShardStream` over its shards (partition mode: every sample once, no shuffle, no padding;
``num_workers`` lanes read the part's shards in parallel), so every store, foreign shard
layout, label key, pixel limit and bad-sample rule of training applies unchanged. The
eval loader (pipelines/views/eval_loader.py) decodes, resizes, crops and normalises the
batches (DALI, `mixed` decode on a GPU, or torchvision); `Prefetch` runs it in a thread so
reading and decoding overlap the forward pass.

Per-shard bad-sample limits are off here (``max_bad_fraction=1``): the job applies
``data.max_bad_fraction`` to the rank's whole share, as training does to an epoch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sslstream.orchestration.embed.plan import Part
from sslstream.orchestration.embed.settings import EmbedSettings
from sslstream.pipelines.shards.sample import BAD_REASONS, Sample
from sslstream.pipelines.shards.stream import ShardStream


@dataclass(frozen=True)
class PartRead:
    """A part the stream has read to its end, with what its reader skipped, per reason."""

    number: int
    bad: dict[str, int]


class PartStream:
    """The samples of ``parts`` (see the module docstring). Looks like a partitioned
    one-rank ShardStream to the eval loader (``partition``, ``rank``, ``world_size``,
    ``validate``, ``len``)."""

    partition = True
    rank, world_size = 0, 1

    def __init__(self, parts: Sequence[Part], urls: Sequence[str], settings: EmbedSettings,
                 label_key: str) -> None:
        self.parts, self.urls, self.settings = list(parts), list(urls), settings
        self.label_key = label_key
        self.validate = settings.validate  # the streams check headers: the loader need not
        self.read: list[PartRead] = []     # appended as parts finish (read by another thread)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return sum(p.samples for p in self.parts)

    def stream_of(self, part: Part) -> ShardStream:
        s = self.settings
        return ShardStream([self.urls[i] for i in part.shards], rank=0, world_size=1,
                           num_workers=max(1, min(s.num_workers, len(part.shards))),
                           shuffle=False, exact_epoch=False, partition=True,
                           storage_options=s.storage_options, max_bad_fraction=1.0,
                           validate=s.validate,
                           **{**s.stream_options, "label_key": self.label_key})

    def __iter__(self) -> Iterator[Sample]:
        for part in self.parts:
            stream = self.stream_of(part)
            yield from stream
            counters = stream.counters
            bad = {k: int(counters.get(k, 0)) for k in BAD_REASONS if counters.get(k)}
            with self._lock:
                self.read.append(PartRead(part.number, bad))

    def finished(self) -> list[PartRead]:
        with self._lock:
            return list(self.read)


_END = object()


class _Failed:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class Prefetch:
    """Iterate ``source`` in a daemon thread, at most ``depth`` items ahead of the consumer.
    An exception in the thread is raised in the consumer; `close` stops the thread."""

    def __init__(self, source: Iterator[Any], depth: int) -> None:
        self._q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(source,), daemon=True,
                                        name="sslstream-embed-read")
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, source: Iterator[Any]) -> None:
        try:
            for item in source:
                if not self._put(item):
                    return
            self._put(_END)
        except BaseException as e:  # handed to the consumer, who raises it
            self._put(_Failed(e))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._q.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
