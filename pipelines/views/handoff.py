"""Thread and CUDA-stream plumbing of the two-view loader (pipelines/views/loader.py).

The loader's device thread produces batches; the trainer's thread consumes them. On a GPU
the producer works on its own stream of the loader's device, and the batch crosses to the
consumer's stream by an event, not by a host synchronisation:

- `DeviceWork` (producer): selects the loader's CUDA device in the thread (a new thread
  starts on device 0, wrong for LOCAL_RANK > 0 under torchrun) and makes a side stream
  current; `done()` records an event after the batch's work was enqueued.
- `hand_to_current_stream` (consumer): the consumer's current stream waits on that event
  (GPU-side), and `record_stream` tells torch's caching allocator that stream uses the
  tensors, so memory freed by the trainer is not handed to the side stream for a later batch
  before the trainer's kernels that read it have run.
On the CPU both are no-ops.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable
from typing import Any

import torch

POLL_S = 0.1  # how often blocked queue operations look at the stop flag


class Failure:
    """An exception a worker thread hands to the consumer instead of dying silently."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Block until `item` is queued (True) or `stop` is set (False): never a stuck thread."""
    while not stop.is_set():
        try:
            q.put(item, timeout=POLL_S)
            return True
        except queue.Full:
            continue
    return False


class DeviceWork(contextlib.AbstractContextManager):
    """The producer side: `with DeviceWork(device) as w: ...; ready = w.done()`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream: torch.cuda.Stream | None = None
        self._ctx = contextlib.ExitStack()

    def __enter__(self) -> DeviceWork:
        if self.device.type == "cuda":
            self._ctx.enter_context(torch.cuda.device(self.device))
            self.stream = torch.cuda.Stream(self.device)
            self._ctx.enter_context(torch.cuda.stream(self.stream))
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.close()

    def done(self) -> torch.cuda.Event | None:
        """An event after everything enqueued so far on the side stream (None on the CPU)."""
        if self.stream is None:
            return None
        ready = torch.cuda.Event()
        ready.record(self.stream)
        return ready


def hand_to_current_stream(tensors: Iterable[torch.Tensor], ready: torch.cuda.Event,
                           device: torch.device) -> None:
    """Consumer side: wait for `ready` on the current stream of `device` and mark the
    tensors as used by it (see the module docstring)."""
    current = torch.cuda.current_stream(device)
    current.wait_event(ready)
    for t in tensors:
        t.record_stream(current)
