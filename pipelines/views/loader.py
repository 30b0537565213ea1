"""Stream -> two augmented views -> torch batches, resumable, with the data-wait measured.

Batch k of an epoch is made of stream samples [k*B, (k+1)*B) of this rank, and its random
augmentation parameters come from the key (seed, epoch, rank, k, view) (see recipes.py). So the
loader's whole state is the epoch, the number of batches consumed and the stream's cursor at
that point; resuming from it yields the same next batches as never stopping (bit-for-bit on
CPU). Two background threads overlap the work with the training step: a host thread pulls
samples, validates them and draws the parameters (pipelines/views/hostprep.py) -- or, with
`workers > 0`, receives batches that reader processes prepared out of this process's GIL
(pipelines/views/workers.py); a device thread runs the backend (DALI releases the GIL while it
works; pipelined, `pipeline_depth` batches in flight). Bounded queues (`prefetch`) keep memory
flat. The batches are the same whatever `workers` and `pipeline_depth` are.

On a GPU the device thread works on a side stream of the loader's device and the batch
reaches the trainer's stream by an event (pipelines/views/handoff.py): no per-batch host sync.

A sample that fails validation, or that makes the backend fail, is replaced in its batch by a
copy of a good neighbour of the same batch (and counted), so every rank still takes exactly
len(stream) // batch_size steps and DDP never waits on a missing batch.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from sslstream.pipelines.shards.badsamples import reason_of, report_bad
from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.shards.validate import VALIDATE_MODES, CorruptImage, validate_image
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views.backend import effective_validation, image_hw, resolve_backend
from sslstream.pipelines.views.handoff import (
    POLL_S,
    DeviceWork,
    Failure,
    hand_to_current_stream,
    put,
)
from sslstream.pipelines.views.hostprep import (
    HostBatch,
    draw_params,
    host_batches,
    nearest,
    position_stream,
)
from sslstream.pipelines.views.recipes import TwoViewRecipe

if TYPE_CHECKING:
    from sslstream.pipelines.views.reference import TorchvisionTwoView

__all__ = ["Batch", "TwoViewLoader", "effective_validation", "image_hw", "resolve_backend"]


@dataclass
class Batch:
    """One batch of views: ``views[0]``, ``views[1]`` the global crops, ``views[2:]`` the
    local crops of a multi-crop recipe (``augment.local.count`` of them, a smaller size)."""

    views: list[torch.Tensor]  # each (B, 3, S, S) on the trainer's device, normalised, dtype per config
    labels: torch.Tensor       # (B,) int64
    keys: list[str]

    @property
    def view1(self) -> torch.Tensor:
        """The first global crop."""
        return self.views[0]

    @property
    def view2(self) -> torch.Tensor:
        """The second global crop."""
        return self.views[1]


class TwoViewLoader:
    """Iterate two-view batches of a `SampleStream` (see docs/contracts.md)."""

    def __init__(self, stream: SampleStream, recipe: TwoViewRecipe, *, batch_size: int, device: torch.device | str,
                 backend: str = "auto", seed: int = 0, num_threads: int = 2,
                 dtype: torch.dtype = torch.float32, channels_last: bool = False, prefetch: int = 2,
                 validate: str = "auto", hw_decoder_load: float = 0.65,
                 rank: int | None = None, workers: int = 0,
                 nvjpeg_padding: int | None = None, pipeline_depth: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"loader dtype={dtype}: expected float32, float16 or bfloat16")
        self.stream, self.recipe, self.batch_size = stream, recipe, batch_size
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda" -> "cuda:N"
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.seed, self.prefetch = int(seed), max(1, prefetch)
        self.rank = int(rank if rank is not None else stream.rank)
        self.backend_name = resolve_backend(backend)
        if validate != "auto" and validate not in VALIDATE_MODES:
            raise ValueError(f"loader validate={validate!r}: expected 'auto' or one of "
                             f"{VALIDATE_MODES}")
        self.validate = effective_validation(validate, stream)
        self.workers = max(0, int(workers))
        self._nvjpeg_padding = nvjpeg_padding
        self.pipeline_depth = max(1, int(pipeline_depth))
        self._backend: dali_mod.DaliTwoView | TorchvisionTwoView | None = self._build_backend(
            num_threads, dtype, channels_last, hw_decoder_load)
        self.data_wait_s = 0.0
        self.last_wait_s = 0.0
        self._aug = {"aug_skipped_corrupt": 0, "aug_backend_errors": 0, "aug_padded": 0,
                     "batches": 0}
        self._epoch = 0
        self._position = 0            # batches of self._epoch already handed out
        self._stream_state: dict | None = None  # stream cursor right after those batches
        self._restored = False        # a state was loaded and not yet iterated
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._feed = None              # reader process(es), started on the first epoch
        self._feed_state: dict | None = None

    # ------------------------------------------------------------------ construction
    def _build_backend(self, num_threads: int, dtype: torch.dtype, channels_last: bool,
                       hw_decoder_load: float) -> dali_mod.DaliTwoView | TorchvisionTwoView:
        if self.backend_name == "dali":
            device_id = self.device.index if self.device.type == "cuda" else None
            pad = {"nvjpeg_padding": self._nvjpeg_padding} if self._nvjpeg_padding else {}
            spec = dali_mod.GraphSpec(recipe=self.recipe, batch_size=self.batch_size,
                                      device_id=device_id, num_threads=num_threads, dtype=dtype,
                                      channels_last=channels_last, hw_decoder_load=hw_decoder_load,
                                      depth=self.pipeline_depth, **pad)
            return dali_mod.DaliTwoView(spec)
        from sslstream.pipelines.views.reference import TorchvisionTwoView

        return TorchvisionTwoView(self.recipe, num_threads=num_threads, dtype=dtype,
                                  channels_last=channels_last)

    # ------------------------------------------------------------------ public API
    def __len__(self) -> int:
        return len(self.stream) // self.batch_size

    @property
    def counters(self) -> dict[str, int]:
        feed = self._feed
        base = self.stream.counters
        if feed is not None and feed.counters:
            # the reader process counts what it read; this process's stream copy only what
            # the decoder here rejected (count_bad): the sum, per reason
            for k, v in feed.counters.items():
                base[k] = base.get(k, 0) + v
        with self._lock:
            base.update(self._aug)
        return base

    def set_epoch(self, epoch: int) -> None:
        """Select `epoch`, from its first batch -- unless the cursor is already inside it
        (a loaded state, or an iteration left with `break`): then it is kept."""
        inside = 0 < self._position < len(self) or (self._restored and self._position > 0)
        if int(epoch) == self._epoch and inside:
            return
        self._epoch, self._position, self._stream_state = int(epoch), 0, None
        self._restored = False

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._position, "seed": self.seed,
                "batch_size": self.batch_size, "recipe": self.recipe.name,
                "stream": self._stream_state}

    def load_state_dict(self, state: dict) -> None:
        if state.get("batch_size", self.batch_size) != self.batch_size:
            raise ValueError(f"loader state has batch_size={state['batch_size']}, this loader "
                             f"{self.batch_size}: batch k would not be the same samples")
        self.close_epoch()
        self._epoch, self._position = int(state["epoch"]), int(state["batch"])
        self.seed = int(state.get("seed", self.seed))
        self._stream_state = state.get("stream")
        self._restored = True

    def __iter__(self) -> Iterator[Batch]:
        """The rest of the current epoch. A finished epoch iterates again from its start,
        except right after loading a state saved at its end (then: nothing left)."""
        self.close_epoch()
        total = len(self)
        restored, self._restored = self._restored, False
        if self._position >= total:
            if restored:
                return iter(())
            self._position, self._stream_state = 0, None
        if self._backend is not None and self._start_feed():
            # the reader process positions its own copy of the stream; this one only keeps
            # the epoch's bad-sample counts (decoder rejections + the reader's), reset here
            self.stream.set_epoch(self._epoch)
            self._feed_state = self._stream_state if self._position > 0 else None
            if self._position > 0 and self._stream_state is None:
                raise RuntimeError("loader resumed at batch > 0 without a stream cursor")
        else:
            position_stream(self.stream, self._epoch, self._position, self._stream_state)
        return self._run_epoch(self._position, total)

    def _start_feed(self) -> bool:
        """Start the reader process(es) once (workers > 0); False: read in this process.
        A stream that cannot be pickled (a class defined in a function) is read here."""
        if self._feed is not None:
            return True
        if self.workers <= 0:
            return False
        import multiprocessing
        import pickle
        import warnings

        from sslstream.pipelines.views.workers import ProcessFeed

        if multiprocessing.current_process().daemon:
            warnings.warn(f"loader workers={self.workers}: this is a daemonic process, which "
                          "may not start processes; reading in this process", stacklevel=3)
            self.workers = 0
            return False
        try:
            pickle.dumps(self.stream)
        except Exception as e:
            warnings.warn(f"loader workers={self.workers}: the stream cannot be sent to a "
                          f"worker process ({type(e).__name__}: {e}); reading in this process",
                          stacklevel=3)
            self.workers = 0
            return False
        self._feed = ProcessFeed(self.stream, self.recipe, batch_size=self.batch_size,
                                 validate=self.validate, seed=self.seed, rank=self.rank,
                                 workers=self.workers, prefetch=self.prefetch,
                                 depth=self._backend.depth)
        return True

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the reader processes (empty when reading in this process)."""
        return self._feed.pids if self._feed is not None else []

    def close(self) -> None:
        """Stop the background threads and reader processes, free the backend (DALI
        pipeline, thread pool). Also run at interpreter exit and by `with` blocks."""
        try:
            self.close_epoch()
        finally:
            feed, self._feed = self._feed, None
            if feed is not None:
                feed.close()
            backend, self._backend = self._backend, None
            if backend is not None:
                backend.close()

    def __enter__(self) -> TwoViewLoader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ the epoch
    def close_epoch(self) -> None:
        """Stop the current epoch's threads (an abandoned iterator, a `break`)."""
        self._stop_threads(self._stop, self._threads)
        self._stop = threading.Event()
        if self._feed is not None:
            self._feed.reclaim()  # shared-memory slots of batches never collected

    def _stop_threads(self, stop: threading.Event, threads: list[threading.Thread]) -> None:
        stop.set()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=30)
        alive = [t.name for t in threads if t.is_alive()]
        if self._threads is threads:
            self._threads = []
        if alive:
            raise RuntimeError(f"loader threads did not stop within 30 s: {alive}")

    def _run_epoch(self, start: int, total: int) -> Iterator[Batch]:
        if self._backend is None:
            raise RuntimeError("TwoViewLoader was closed")
        stop, epoch = self._stop, self._epoch
        host_q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        out_q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        self._threads = [
            threading.Thread(target=self._host_loop, args=(epoch, start, total, host_q, stop),
                             name=f"sslstream-host-e{epoch}", daemon=True),
            threading.Thread(target=self._device_loop,
                             args=(epoch, host_q, out_q, stop, total - start),
                             name=f"sslstream-device-e{epoch}", daemon=True),
        ]
        threads = self._threads
        for t in threads:
            t.start()
        try:
            for _ in range(start, total):
                t0 = time.perf_counter()
                item = self._get(out_q, threads)
                self.last_wait_s = time.perf_counter() - t0
                self.data_wait_s += self.last_wait_s
                if isinstance(item, Failure):
                    raise item.exc
                batch, index, stream_state, ready = item
                if ready is not None:
                    hand_to_current_stream((*batch.views, batch.labels), ready, self.device)
                self._position, self._stream_state = index + 1, stream_state
                with self._lock:
                    self._aug["batches"] += 1
                yield batch
        finally:
            self._stop_threads(stop, threads)

    def _get(self, q: queue.Queue, threads: list[threading.Thread]):
        while True:
            try:
                return q.get(timeout=POLL_S)
            except queue.Empty:
                if not any(t.is_alive() for t in threads):
                    try:
                        return q.get_nowait()
                    except queue.Empty:
                        raise RuntimeError("loader threads exited without a batch") from None

    def _host_loop(self, epoch: int, start: int, total: int, host_q: queue.Queue,
                   stop: threading.Event) -> None:
        """Read here (workers=0), or receive the reader process's batches."""
        try:
            if self._feed is not None:
                batches = self._feed.epoch(epoch, start, total, self._feed_state, stop.is_set)
            else:
                batches = host_batches(self.stream, self.recipe, epoch=epoch, start=start,
                                       total=total, batch_size=self.batch_size,
                                       validate=self.validate, seed=self.seed, rank=self.rank,
                                       stopped=stop.is_set)
            for host in batches:
                with self._lock:
                    self._aug["aug_skipped_corrupt"] += host.n_bad
                    self._aug["aug_padded"] += host.n_pad
                feed = self._feed
                if feed is not None:
                    if feed.position is not None:
                        self.stream.position = feed.position  # how far the reading got
                    # the reader's bad samples + this process's decoder rejections: one limit
                    self.stream.set_external_bad(feed.epoch_bad,
                                                 host.shards[-1] if host.shards else "?")
                if not put(host_q, host, stop):
                    return
        except BaseException as e:  # hand the error to the consumer instead of dying silently
            put(host_q, Failure(e), stop)

    def _device_loop(self, epoch: int, host_q: queue.Queue, out_q: queue.Queue,
                     stop: threading.Event, remaining: int) -> None:
        """Run the backend on each host batch. A pipelined backend (DALI, depth >= 2) gets
        batch k+1 submitted before batch k is collected, so its decode overlaps; batches
        still leave in order, and a reading error comes after the batches read before it."""
        depth = self._backend.depth  # _run_epoch checked that the loader is open
        inflight: collections.deque[HostBatch] = collections.deque()
        submitted = 0
        try:
            with DeviceWork(self.device) as work:
                while not stop.is_set():
                    if inflight and (len(inflight) >= depth or submitted == remaining):
                        host = inflight.popleft()
                        batch = self._collect(epoch, host, inflight)
                        if not put(out_q, (batch, host.index, host.stream_state, work.done()),
                                   stop):
                            return
                        continue
                    if submitted == remaining:
                        return
                    try:
                        host = host_q.get(timeout=POLL_S)
                    except queue.Empty:
                        continue
                    if isinstance(host, Failure):
                        while inflight and not stop.is_set():  # what was read before it
                            done = inflight.popleft()
                            batch = self._collect(epoch, done, inflight)
                            put(out_q, (batch, done.index, done.stream_state, work.done()), stop)
                        put(out_q, host, stop)
                        return
                    submitted += 1
                    if depth > 1:
                        self._submit(epoch, host, inflight)
                        continue
                    batch = self._augment(epoch, host)
                    if not put(out_q, (batch, host.index, host.stream_state, work.done()), stop):
                        return
        except BaseException as e:
            put(out_q, Failure(e), stop)

    def _submit(self, epoch: int, host: HostBatch, inflight: collections.deque) -> None:
        """Feed `host` to the pipelined backend (its errors surface at `collect`)."""
        self._backend.submit(host.images, host.params)
        inflight.append(host)

    def _collect(self, epoch: int, host: HostBatch, inflight: collections.deque) -> Batch:
        """The oldest batch's views; on a backend error, recover that batch (which rebuilds
        the pipeline) and feed the batches that were in flight behind it again."""
        try:
            views = self._backend.collect()
        except Exception as first:
            views = self._recover(epoch, host, first)
            for h in inflight:
                self._backend.submit(h.images, h.params)
        host.done()
        return self._to_batch(host, views)

    def _augment(self, epoch: int, host: HostBatch) -> Batch:
        try:
            views = self._backend.run(host.images, host.params)
        except Exception as first:
            views = self._recover(epoch, host, first)
        host.done()
        return self._to_batch(host, views)

    def _to_batch(self, host: HostBatch, views: Sequence[torch.Tensor]) -> Batch:
        labels = torch.tensor(host.labels, dtype=torch.int64)
        out = list(views)
        if self.device.type == "cuda":  # non_blocking uploads need pinned sources
            labels = labels.pin_memory().to(self.device, non_blocking=True)
            if out[0].device.type == "cpu":  # the torchvision backend works on the host
                out = [v.pin_memory().to(self.device, non_blocking=True) for v in out]
        elif out[0].device != self.device:
            out, labels = [v.to(self.device) for v in out], labels.to(self.device)
        return Batch(views=out, labels=labels, keys=host.keys)

    def _recover(self, epoch: int, host: HostBatch, error: Exception):
        """The backend failed on this batch: find the culprits with a full decode, replace them."""
        with self._lock:
            self._aug["aug_backend_errors"] += 1
        self._backend.reset()
        bad, rejected = [], []
        host.images = [bytes(b) for b in host.images]  # slices of a worker's buffer
        for i, data in enumerate(host.images):
            try:
                validate_image(data, "decode")
            except CorruptImage as e:
                bad.append(i)
                rejected.append((reason_of(e), host.shards[i]))
        good = [i for i in range(len(host.images)) if i not in set(bad)]
        if not bad or not good:
            raise RuntimeError(f"{self.backend_name} failed on batch {host.index} of epoch {epoch} "
                               f"(shards {sorted(set(host.shards))}) and a full decode found "
                               f"{len(bad)} bad image(s): {error}") from error
        order = [i if i in good else nearest(good, i) for i in range(len(host.images))]
        with self._lock:
            self._aug["aug_skipped_corrupt"] += len(bad)
        report_bad(self.stream, rejected)
        host.images = [host.images[i] for i in order]
        host.hw, host.labels = host.hw[order], [host.labels[i] for i in order]
        host.keys = [host.keys[i] for i in order]
        return self._backend.run(host.images, draw_params(self.recipe, self.seed, epoch,
                                                          self.rank, host.index, host.hw))

