"""Shared-memory slots for the reader process's batches: images cross without a copy.

Why: through a pipe, a batch of 256 ImageNet-size JPEGs (~14 MB) was copied twice in the
trainer process (the pipe read and the unpickled bytes object): ~18 ms of trainer CPU per
batch, more than the old in-process design. Here the reader process writes a batch's images
into one of K shared-memory slots and sends only the slot's name and the offsets; the
trainer hands zero-copy memoryviews of the slot to the backend (DALI copies them into its own
input buffers when fed) and gives the slot back once the batch has been collected.

Slots are owned by the reader process (created, grown, unlinked by it); the trainer only
attaches. Free slot numbers travel through one queue in both directions.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from multiprocessing.shared_memory import SharedMemory
from typing import Any

MIN_SLOT = 1 << 20


class SlotWriter:
    """Reader-process side: `write(images)` -> (slot, segment name, total bytes)."""

    def __init__(self, free: Any) -> None:
        self.free = free
        self.segs: dict[int, SharedMemory] = {}

    def acquire(self, cancelled: Callable[[], bool], poll_s: float = 0.1) -> int | None:
        while not cancelled():
            try:
                return int(self.free.get(timeout=poll_s))
            except queue.Empty:
                continue
        return None

    def write(self, slot: int, images: list) -> tuple[str, int]:
        total = sum(len(b) for b in images)
        seg = self.segs.get(slot)
        if seg is None or seg.size < total:
            if seg is not None:
                seg.close()
                seg.unlink()
            seg = SharedMemory(create=True, size=max(MIN_SLOT, int(total * 1.25)))
            self.segs[slot] = seg
        buf, off = seg.buf, 0
        for b in images:
            n = len(b)
            buf[off:off + n] = b
            off += n
        return seg.name, total

    def give_back(self, slot: int) -> None:
        self.free.put(slot)

    def close(self) -> None:
        for seg in self.segs.values():
            with contextlib.suppress(Exception):
                seg.close()
                seg.unlink()
        self.segs.clear()


class SlotReader:
    """Trainer side: zero-copy views of a slot; `release(slot)` once the batch is done."""

    def __init__(self, free: Any, slots: int) -> None:
        self.free = free
        self._attached: dict[str, Any] = {}
        self._out: set[int] = set()  # slots handed to the loader, not yet released
        self._lock = threading.Lock()
        for i in range(slots):
            free.put(i)

    def view(self, slot: int, name: str, nbytes: int) -> memoryview:
        seg = self._attached.get(name)
        if seg is None:
            seg = _attach(name)
            self._attached[name] = seg
        with self._lock:
            self._out.add(slot)
        return memoryview(seg)[:nbytes]

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._out:
                return
            self._out.discard(slot)
        self.free.put(slot)

    def discard(self, slot: int) -> None:
        """A slot whose message was dropped (an abandoned epoch): straight back."""
        self.free.put(slot)

    def reclaim(self) -> None:
        """After an epoch's threads stopped: every slot still out is free again."""
        with self._lock:
            out, self._out = self._out, set()
        for slot in out:
            self.free.put(slot)

    def close(self) -> None:
        # a plain mmap: freed with its last view (views may outlive the loader briefly)
        self._attached.clear()


def _attach(name: str) -> Any:
    """Map the reader's segment read-only-ish as a plain mmap (not a SharedMemory object:
    its __del__ raises while views exist, and it would register the name with the resource
    tracker again). The reader process owns and unlinks the segment."""
    import mmap
    import os

    path = f"/dev/shm/{name.lstrip('/')}"
    if not os.path.exists(path):  # not Linux: the portable way
        return SharedMemory(name=name).buf
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)
