"""Reader processes: the stream, validation and parameter drawing out of the trainer's GIL.

Why: in the trainer process the reader lanes (tar headers, gzip, header checks, queues,
~22 us per sample), the parameter drawing and the batch assembly share one GIL with the
training loop, which dispatches ~1,000 ops per step from Python: whatever the GPU does, the
sum is a ceiling on img/s, and every ms the step spends in Python is a ms the reader waits.
Here one spawned process per rank runs all of it (the same `hostprep.host_batches` the
in-process path runs, so the batches are the same, bit for bit, whatever runs them), and the
trainer only receives ready batches: the encoded images packed in ONE buffer, their sizes,
labels, keys, the stream cursor after them and both views' parameters (one pickle per batch,
~0.1 ms for 256 CIFAR images; the images are handed on as zero-copy slices of the buffer).
With `workers > 1` the stream's reader lanes run in `workers - 1` further processes
(pipelines/shards/lanes.py); the lanes' order is fixed by the stream's `num_workers`, so the
number of processes never changes the samples.

Guarantees kept (tests/pipelines/test_workers.py, and the loader tests with workers=2):
- the same batches for a seed whatever the number of workers; exact mid-epoch resume (the
  stream cursor travels with each batch; the loader saves the one of the last batch consumed);
- errors in a worker (a BadDataError, a storage error) are raised in the consumer with their
  type; a worker that dies (killed, out of memory) is reported with its exit code or signal,
  never waited on;
- shutdown: `close()` stops and joins the workers (terminate, then kill); workers ignore
  SIGINT (Ctrl-C reaches the whole process group: the trainer decides) and exit by
  themselves within a second when the trainer process is gone (SIGKILL, SIGTERM without a
  handler): no orphans.

Why processes over DALI's parallel external_source or torch DataLoader workers
(docs/data.md has the measurements): both want stateless per-sample or per-batch callbacks
that any worker can run for any index; the stream is sequential and stateful (shuffle
buffer, top-ups, the bad-sample log its resume relies on), so it cannot be split by index
without reading every shard once per worker. One reader process per rank runs it as it is.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import queue
from collections.abc import Iterator
from typing import Any

import numpy as np
from sslstream.pipelines.shards.procs import (
    WorkerError,
    child_setup,
    describe_exit,
    portable_error,
    start_process,
    stop_process,
)
from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.views.hostprep import HostBatch, host_batches, position_stream
from sslstream.pipelines.views.recipes import TwoViewRecipe
from sslstream.pipelines.views.shm import SlotReader, SlotWriter

__all__ = ["ProcessFeed", "WorkerError", "pack", "unpack"]

POLL_S = 0.1


def pack(host: HostBatch, writer: SlotWriter, slot: int) -> tuple:
    """The images into shared-memory slot `slot`, everything else pickled (small)."""
    sizes = np.fromiter((len(b) for b in host.images), dtype=np.int64, count=len(host.images))
    offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
    np.cumsum(sizes, out=offsets[1:])
    name, nbytes = writer.write(slot, host.images)
    return (host.index, (slot, name, nbytes), offsets, host.hw, host.labels, host.keys,
            host.shards, host.stream_state, host.params, host.n_bad, host.n_pad)


def unpack(msg: tuple, reader: SlotReader) -> HostBatch:
    index, (slot, name, nbytes), offsets, hw, labels, keys, shards, state, params, bad, pad = msg
    view = reader.view(slot, name, nbytes)
    images = [view[a:b] for a, b in zip(offsets[:-1].tolist(), offsets[1:].tolist(), strict=True)]
    return HostBatch(index, images, hw, labels, keys, shards, state, params, bad, pad,
                     release=lambda: reader.release(slot))


def _feeder_main(payload: bytes, tasks: Any, out: Any, current: Any, parent: int,
                 lanes: Any = None, free: Any = None) -> None:
    child_setup(parent)
    writer = SlotWriter(free)
    try:
        _feed(payload, tasks, out, current, lanes, writer)
    finally:
        writer.close()


def _feed(payload: bytes, tasks: Any, out: Any, current: Any, lanes: Any,
          writer: SlotWriter) -> None:
    stream: SampleStream
    stream, recipe, cfg = pickle.loads(payload)
    if lanes is not None:  # the stream's reader lanes go to the lane processes
        stream.lane_pool = lanes
    for task in iter(tasks.get, None):  # None: stop (a dead parent is child_setup's watcher's)
        job, epoch, start, total, state = task

        def cancelled(job: int = job) -> bool:
            return current.value != job

        def send(msg: tuple, job: int = job) -> bool:
            while not cancelled(job):
                try:
                    out.put(msg, timeout=POLL_S)
                    return True
                except queue.Full:
                    continue
            return False

        try:
            position_stream(stream, epoch, start, state)
            for host in host_batches(stream, recipe, epoch=epoch, start=start, total=total,
                                     batch_size=cfg["batch_size"], validate=cfg["validate"],
                                     seed=cfg["seed"], rank=cfg["rank"], stopped=cancelled):
                counters = stream.counters
                slot = writer.acquire(cancelled)
                if slot is None:
                    break
                if not send((job, "batch", pack(host, writer, slot), counters,
                             stream.position, stream.epoch_bad)):
                    writer.give_back(slot)
                    break
        except BaseException as e:  # the consumer raises it, with its type where possible
            send((job, "error", portable_error(e), None, None, None))


# ---------------------------------------------------------------------------- parent side


def _ctx():
    # spawn: fork is unsafe once CUDA, DALI or the loader's threads exist (DALI #3182)
    return mp.get_context("spawn")


class ProcessFeed:
    """The parent's handle on one rank's reader process (and its lane processes)."""

    def __init__(self, stream: SampleStream, recipe: TwoViewRecipe, *, batch_size: int,
                 validate: str, seed: int, rank: int, workers: int = 1, prefetch: int = 2,
                 depth: int = 1) -> None:
        ctx = _ctx()
        self.workers = max(1, int(workers))
        self._lanes = None
        if self.workers > 1 and stream.num_workers > 0:
            from sslstream.pipelines.shards.lanes import LanePool

            self._lanes = LanePool(self.workers - 1, lanes=stream.num_workers, ctx=ctx)
        cfg = {"batch_size": batch_size, "validate": validate, "seed": seed, "rank": rank}
        payload = pickle.dumps((stream, recipe, cfg))
        self._tasks = ctx.Queue()
        self._out = ctx.Queue(maxsize=max(1, prefetch))
        self._current = ctx.Value("q", -1, lock=False)
        # shared-memory slots: this queue + the loader's host queue + the backend's batches
        # in flight + the ones being written / unpacked; fewer could stall the pipelined
        # backend waiting for its `depth`-th batch while the reader waits for a free slot
        free = ctx.Queue()
        self._slots = SlotReader(free, slots=2 * max(1, prefetch) + max(1, depth) + 4)
        self._job = 0
        self.counters: dict[str, int] = {}
        self.position: int | None = None
        self.epoch_bad = 0  # the reader's count of this epoch's bad samples, with each batch
        self._proc = ctx.Process(target=_feeder_main, name="sslstream-reader",
                                 args=(payload, self._tasks, self._out, self._current,
                                       os.getpid(), self._lanes.handle() if self._lanes else None,
                                       free),
                                 daemon=True)
        start_process(self._proc)
        self._closed = False

    @property
    def pids(self) -> list[int]:
        pids = [self._proc.pid] if self._proc.pid else []
        return pids + (self._lanes.pids if self._lanes else [])

    def epoch(self, epoch: int, start: int, total: int, stream_state: dict | None,
              stopped) -> Iterator[HostBatch]:
        """Batches start..total-1 of `epoch` from the worker, in order."""
        if self._closed:
            raise RuntimeError("reader processes were closed")
        self._job += 1
        job = self._job
        self._current.value = job
        self._tasks.put((job, epoch, start, total, stream_state))
        got = start
        try:
            while got < total and not stopped():
                msg = self._get(stopped)
                if msg is None:
                    return
                _, kind, body, counters, position, epoch_bad = msg
                if msg[0] != job:  # left over from an abandoned epoch
                    if kind == "batch":
                        self._slots.discard(body[1][0])
                    continue
                if kind == "error":
                    raise body
                self.counters, self.position, self.epoch_bad = counters, position, epoch_bad
                got += 1
                yield unpack(body, self._slots)
        finally:
            if self._current.value == job:
                self._current.value = -1  # the worker abandons the epoch

    def reclaim(self) -> None:
        """The epoch's threads have stopped: slots of batches never collected are free."""
        self._slots.reclaim()

    def _get(self, stopped):
        while not stopped():
            try:
                return self._out.get(timeout=POLL_S)
            except queue.Empty:
                self.check_alive()
        return None

    def check_alive(self) -> None:
        if not self._proc.is_alive():
            raise WorkerError(f"loader reader process {self._proc.pid} died "
                              f"({describe_exit(self._proc)}) without reporting an error")
        if self._lanes is not None:
            self._lanes.check_alive()

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop and join every worker (terminate, then kill): never leaves one behind."""
        if self._closed:
            return
        self._closed = True
        self._current.value = -1
        with contextlib.suppress(Exception):
            self._tasks.put(None)
        stop_process(self._proc, timeout_s)
        if self._lanes is not None:
            self._lanes.close(timeout_s)
        self._slots.close()
        for q in (self._tasks, self._out, self._slots.free):
            q.cancel_join_thread()
            q.close()


