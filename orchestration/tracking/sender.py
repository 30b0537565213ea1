"""A bounded background sender: the training step enqueues, one daemon thread talks to MLflow.

Why: a `log_batch` to a slow or dead server blocks for its HTTP timeout and retries (10 s x 3
by default); called from the monitor inside the loop, that stalled every rank at the next
collective. Here the step only appends to a bounded FIFO (microseconds); when the queue is
full (the server cannot keep up) new items are dropped and counted (`dropped`), never
waited for. `flush(timeout_s)` waits, bounded, for what is queued (end of run, before the
plots read the metric history back).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("sslstream.tracking")
_STOP = object()


class BackgroundSender:
    """FIFO of items handed to `send` by one daemon thread started on first use."""

    def __init__(self, send: Callable[[Any], None], maxsize: int = 1000,
                 name: str = "sslstream-mlflow") -> None:
        self._send, self._name = send, name
        self._q: queue.Queue = queue.Queue(max(1, int(maxsize)))
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0           # queued or being sent
        self.dropped = 0
        self.sent = 0

    def put(self, item: Any) -> bool:
        """Queue `item` without ever blocking; False (and counted) when the queue is full."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            try:
                self._q.put_nowait(item)
            except queue.Full:
                self.dropped += 1
                if self.dropped == 1:
                    log.warning("MLflow is not keeping up: metrics queue full (%d), dropping "
                                "metrics (counted in perf/metrics_dropped)", self._q.maxsize)
                return False
            self._pending += 1
            return True

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is _STOP:
                return
            try:
                self._send(item)
                self.sent += 1
            except Exception as e:  # the sender degrades by itself; never kill the thread
                log.debug("background MLflow call failed: %s", e)
            finally:
                with self._lock:
                    self._pending -= 1

    @property
    def pending(self) -> int:
        with self._lock:
            return self._pending

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait (at most `timeout_s`) until everything queued has been sent; True if so."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while self.pending and time.monotonic() < deadline:
            time.sleep(0.005)
        return self.pending == 0

    def close(self, timeout_s: float = 10.0) -> None:
        """Flush (bounded), then stop the thread; what is still queued is dropped, counted."""
        self.flush(timeout_s)
        with self._lock:
            thread, self._thread = self._thread, None
            left = self._pending
            while True:  # what is still queued is not sent any more
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    break
                if item is not _STOP:
                    self._pending -= 1
        if left:
            self.dropped += left
            log.warning("%d metric batch(es) not sent to MLflow within %.0f s at the end",
                        left, timeout_s)
        if thread is not None and thread.is_alive():
            try:
                self._q.put_nowait(_STOP)
            except queue.Full:
                return  # a daemon thread blocked on a dead server: the process exit ends it
            thread.join(timeout=1.0)
