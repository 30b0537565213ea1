"""SIGINT, SIGTERM and SIGUSR1, one way for every phase: stop, keep a resumable state, say so.

A Ctrl-C (SIGINT), a preemption (SIGTERM) and a scheduler's notice that the time limit is
near (SIGUSR1: Slurm's `--signal=USR1@90`, docs/cluster.md) mean the same thing to a job:
stop soon, keep the work. Python's default turns SIGINT into a KeyboardInterrupt anywhere
and lets SIGTERM and SIGUSR1 kill the process (no checkpoint, the MLflow run left RUNNING).
Instead, `interrupts` (one per process, installed by the CLI or by `train()`) turns each of
them into `Interrupted`:

* *deferred* (inside `with interrupts.deferred():`, the training loop): the first signal
  only sets `requested`; the loop agrees on it across ranks at the next step boundary,
  checkpoints and returns "preempted". A second signal raises at once (the user insists),
  except SIGUSR1: a notice may reach a worker twice (from the scheduler and forwarded by
  torchrun's agent) and never means "now"; after a first signal it is ignored everywhere.
* elsewhere (loading, evaluating, registering, the retraining job's bookkeeping): raised
  where the main thread is, like a KeyboardInterrupt; `train()` then saves what can be saved
  (the state is consistent outside a step), marks the MLflow run KILLED and re-raises.

`Interrupted.exit_code` is 128 + the signal number (130 SIGINT, 143 SIGTERM, 138 SIGUSR1):
what `sslstream train` / `eval` exit with; `sslstream retrain` exits 8 (EXIT_PREEMPTED).
Rerunning the same command resumes. Handlers can only be installed from the main thread; elsewhere
(a test driving train() from a thread) `install` does nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from typing import Any

__all__ = ["Interrupted", "interrupts", "SIGNALS"]

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


class Interrupted(KeyboardInterrupt):
    """Stopped by SIGINT / SIGTERM / SIGUSR1. A KeyboardInterrupt, so code that already
    cleans up on Ctrl-C (leases, temp files) does the same for the others."""

    def __init__(self, signum: int, detail: str = "") -> None:
        self.signum = int(signum)
        self.detail = detail
        super().__init__(self.message())

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def message(self) -> str:
        return f"stopped by {self.signal_name}" + (f": {self.detail}" if self.detail else "")

    def with_detail(self, detail: str) -> Interrupted:
        return Interrupted(self.signum, detail)


class Interrupts:
    """The process's SIGINT / SIGTERM / SIGUSR1 handler (see the module docstring)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._deferred = 0
        self._installs = 0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def install(self) -> bool:
        """Take over SIGNALS (nested calls count); False off the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return False
        if self._installs == 0:
            self.signum = None
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        self._installs += 1
        return True

    def uninstall(self) -> None:
        if self._installs == 0:
            return
        self._installs -= 1
        if self._installs == 0:
            for sig, prev in self._previous.items():
                with contextlib.suppress(ValueError, TypeError):
                    signal.signal(sig, prev)
            self._previous.clear()

    @property
    def installed(self) -> bool:
        return self._installs > 0

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A first signal inside only sets `requested` (acted on at a step boundary)."""
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1

    def _handle(self, signum: int, frame: object) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
        elif signum == signal.SIGUSR1:
            return  # a repeated notice, in any phase (see the module docstring)
        if self._deferred and first:
            return
        raise Interrupted(signum)

    def reset(self) -> None:
        """Forget a handled signal (tests; a process that goes on after one)."""
        self.signum = None


interrupts = Interrupts()
