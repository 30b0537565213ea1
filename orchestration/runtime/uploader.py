"""Checkpoint publishing off the step path: the step copies the state, a thread uploads it.

Writing a checkpoint to an object store takes seconds (serialising, a multi-part PUT,
retries on 503s); done inside the training loop it stalls every rank for that long. Here
the loop only takes a snapshot (every tensor copied to CPU memory, so the next optimizer
step cannot change what is written) and hands it to one background thread, which
serialises, publishes (orchestration/runtime/checkpoint.py: state object, then manifest) and
prunes to keep-last-K.

The queue is bounded: one upload in flight and at most one snapshot waiting. A newer
snapshot replaces a waiting one (the newest state is the one worth keeping), so a slow
store costs checkpoints, never host memory or step time. A checkpoint that cannot be
written after the store's retries is logged and dropped; training goes on and the newest
published checkpoint stays the one to resume from. `flush()` waits for the queue to drain
and says whether the last snapshot submitted was published: the end of a run and a stop by
a signal wait for it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from sslstream.orchestration.runtime import checkpoint as ckpt
from sslstream.orchestration.runtime.runstore import RunStore

log = logging.getLogger("sslstream.train")

__all__ = ["CheckpointUploader", "snapshot"]


def snapshot(obj: Any) -> Any:
    """A copy of `obj` whose tensors are fresh CPU tensors (containers rebuilt; other leaves,
    immutable plain values, shared)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [snapshot(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(snapshot(v) for v in obj)
    return obj


class CheckpointUploader:
    """Publishes submitted snapshots to `store` from a background thread (module docstring)."""

    def __init__(self, store: RunStore, keep_last: int) -> None:
        self.store, self.keep_last = store, int(keep_last)
        self._cv = threading.Condition()
        self._waiting: tuple[int, dict[str, Any], dict[str, Any]] | None = None
        self._busy = False
        self._closed = False
        self._submitted: int | None = None
        self.published: int | None = None  # newest step this process published
        self.failed: dict[int, str] = {}  # step -> why it was not published
        self.upload_s = 0.0  # seconds spent serialising and uploading (off the step path)
        self._thread = threading.Thread(target=self._run, name="checkpoint-upload", daemon=True)
        self._thread.start()

    def submit(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Queue a snapshot of `state` (taken here, on the caller's thread) for publishing."""
        snap = snapshot(state)
        with self._cv:
            if self._closed:
                raise RuntimeError("checkpoint uploader is closed")
            if self._waiting is not None:
                log.info("checkpoint of step %d replaced by step %d before its upload began",
                         self._waiting[0], step)
            self._waiting = (int(step), snap, dict(meta))
            self._submitted = int(step)
            self._cv.notify_all()

    def flush(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is queued or uploading; True when the newest submitted step is
        published (also when nothing was ever submitted)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cv:
            while self._waiting is not None or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return self._submitted is None or self.published == self._submitted

    def close(self, timeout_s: float | None = None) -> bool:
        """flush(), then stop the thread; returns what flush() returned."""
        ok = self.flush(timeout_s)
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        self._thread.join(timeout=1.0 if not ok else None)
        return ok

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._waiting is None and not self._closed:
                    self._cv.wait()
                if self._waiting is None:
                    return
                step, state, meta = self._waiting
                self._waiting, self._busy = None, True
            t0 = time.perf_counter()
            try:
                data = ckpt.serialize(state)
                del state  # the snapshot's memory goes back before the upload
                ckpt.publish(self.store, step, data, meta)
                del data
                with self._cv:
                    self.published = step
            except Exception as e:  # noqa: BLE001 - logged; training goes on
                with self._cv:
                    self.failed[step] = f"{type(e).__name__}: {e}"
                log.error("checkpoint of step %d was not written to %s (%s: %s); training goes "
                          "on, the newest published checkpoint stays the one to resume from",
                          step, self.store.url, type(e).__name__, e)
            else:
                try:
                    ckpt.prune(self.store, self.keep_last)
                except Exception as e:  # noqa: BLE001 - old checkpoints stay; retried next time
                    log.warning("could not delete old checkpoints in %s (%s: %s); the next "
                                "checkpoint tries again", self.store.url, type(e).__name__, e)
            finally:
                self.upload_s += time.perf_counter() - t0
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()
