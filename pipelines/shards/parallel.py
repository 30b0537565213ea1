"""One job per shard on a few threads, that a Ctrl-C or SIGTERM ends at once.

Why not ThreadPoolExecutor: its `with` block and the interpreter's exit both join its
threads, so an interrupt waits for every running job (and, without cancel_futures, every
queued one): `shards verify` over 30 shards went on for 12 s after a Ctrl-C, and a job in
a stalled object-store read holds the exit for as long as the store's timeout. Here the
calling thread (the one a signal reaches) only waits on a queue; whatever ends that wait
(a job's error, KeyboardInterrupt, the CLI's Interrupted) sets the jobs' `stop`, which
their read loops check (tario.iter_tar_samples), and returns without joining them: the
threads are daemons, so none outlives the process or holds its exit.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["run_each"]

T = TypeVar("T")
R = TypeVar("R")
_POLL_S = 0.5  # the caller's wait wakes this often (a signal is acted on at once anyway)


def run_each(fn: Callable[[T, Callable[[], bool]], R], items: Sequence[T], *, workers: int,
             on_done: Callable[[R, int, int], None] | None = None,
             name: str = "sslstream-job") -> list[R]:
    """[fn(item, stop) for item in items] on `workers` daemon threads, in `items`' order.

    `stop()` turns true once the caller stops waiting (a job failed, or the caller was
    interrupted): jobs should return or raise soon after. `on_done(result, done, total)` is
    called in the calling thread as each job ends (progress). The first job error is
    raised in the calling thread, after the other jobs were told to stop.
    """
    total = len(items)
    if total == 0:
        return []
    stop = threading.Event()
    todo: queue.SimpleQueue[tuple[int, T]] = queue.SimpleQueue()
    for i, item in enumerate(items):
        todo.put((i, item))
    done: queue.SimpleQueue[tuple[int, bool, object]] = queue.SimpleQueue()

    def work() -> None:
        while not stop.is_set():
            try:
                i, item = todo.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((i, True, fn(item, stop.is_set)))
            except BaseException as e:  # noqa: BLE001 (handed to the calling thread)
                done.put((i, False, e))

    for k in range(max(1, min(int(workers), total))):
        threading.Thread(target=work, name=f"{name}-{k}", daemon=True).start()
    results: list[R | None] = [None] * total
    try:
        for n in range(1, total + 1):
            while True:
                try:
                    i, ok, value = done.get(timeout=_POLL_S)
                    break
                except queue.Empty:
                    continue
            if not ok:
                raise value  # type: ignore[misc]
            results[i] = value  # type: ignore[assignment]
            if on_done is not None:
                on_done(value, n, total)  # type: ignore[arg-type]
    finally:
        stop.set()
    return results  # type: ignore[return-value]
