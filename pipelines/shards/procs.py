"""Worker-process plumbing shared by the reader lanes (pipelines/shards/lanes.py) and the
loader's reader process (pipelines/views/workers.py): start without re-running `__main__`,
die with the parent, report errors with their type, stop for sure."""

from __future__ import annotations

import contextlib
import os
import pickle
import signal
import threading
import time
import traceback
from typing import Any

PARENT_CHECK_S = 0.5


class WorkerError(RuntimeError):
    """A loader worker process died or could not report its own error."""


def _watch_parent(parent: int) -> None:
    """Exit when the trainer process is gone (its children are re-parented)."""
    while True:
        time.sleep(PARENT_CHECK_S)
        if os.getppid() != parent:
            os._exit(3)


def child_setup(parent: int) -> None:
    """What every worker does first: Ctrl-C is the trainer's to handle; die with it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True,
                     name="sslstream-parent-watch").start()


def _rebuild(cls: type, args: tuple, state: dict) -> BaseException:
    e = cls.__new__(cls)
    e.args = args
    e.__dict__.update(state)
    return e


class _Portable:
    """Pickles an exception as (type, args, attributes), whatever its __init__ signature:
    BadDataError(message, shard) or ShardNotFound(message, url) do not survive the default
    exception pickling (it calls cls(*args))."""

    def __init__(self, e: BaseException) -> None:
        self.e = e

    def __reduce__(self):
        return (_rebuild, (type(self.e), self.e.args, dict(self.e.__dict__)))


def portable_error(e: BaseException) -> Any:
    """Something that unpickles in the parent as `e` (same type, message and attributes),
    or, failing that, as a WorkerError carrying its type, text and traceback."""
    try:
        pickle.loads(pickle.dumps(_Portable(e)))
        return _Portable(e)
    except Exception:
        tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
        return WorkerError(f"{type(e).__name__}: {e}\n(in a loader worker process)\n{tb}")


@contextlib.contextmanager
def _without_main_reimport():
    """Spawned children re-run the parent's `__main__` unless it is guarded by
    `if __name__ == "__main__"`; a user's training script rarely is, and the workers'
    code lives in importable modules, so the children are told nothing about `__main__`."""
    import sys

    main = sys.modules.get("__main__")
    saved = {k: main.__dict__[k] for k in ("__file__", "__spec__") if main and k in main.__dict__}
    try:
        if main is not None:
            main.__dict__.pop("__file__", None)
            main.__dict__["__spec__"] = None
        yield
    finally:
        if main is not None:
            main.__dict__.pop("__spec__", None)
            main.__dict__.update(saved)


def start_process(proc: Any) -> None:
    with _without_main_reimport():
        proc.start()


def describe_exit(proc: Any) -> str:
    code = proc.exitcode
    if code is None:
        return "still running"
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def stop_process(proc: Any, timeout_s: float) -> None:
    proc.join(timeout_s)
    if proc.is_alive():
        proc.terminate()
        proc.join(2.0)
    if proc.is_alive():
        proc.kill()
        proc.join(2.0)
