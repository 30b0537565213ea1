"""The retraining job's exit codes, one per thing a scheduler should do differently
(documented in docs/retrain.md), and the exception that carries one.
"""

from __future__ import annotations

EXIT_OK = 0               # trained (promoted or not), already done, or nothing new
EXIT_CONFIG = 2           # bad retrain/tracking config (same code as CLI usage errors)
EXIT_LOCK_HELD = 3        # another live holder is retraining this model: try again later
EXIT_SOURCE = 4           # data source (or the lease next to it) unreachable / empty / invalid
EXIT_TRAIN_FAILED = 5     # training raised (non-finite loss, bad data past the limit, ...)
EXIT_REGISTRY = 6         # tracking server unreachable, or registration / tagging failed
EXIT_LEASE_LOST = 7       # lost the lease while training (expired, taken over): rerun resumes
EXIT_PREEMPTED = 8        # stopped by SIGTERM after a checkpoint: rerun resumes


class RetrainExit(Exception):
    """Stop the job with `code` and a one-line `message` for the scheduler's log."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
