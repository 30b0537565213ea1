"""`sslstream embed`'s exit codes: retrain's numbers where the meaning is the same
(orchestration/retrain/exits.py, docs/retrain.md), so one scheduler policy serves both."""

from __future__ import annotations

EXIT_OK = 0               # embedded (or nothing was left to embed)
EXIT_CONFIG = 2           # bad embed/data config or flags: nothing was read
EXIT_SOURCE = 4           # the input shards or --out unreachable / refused / invalid, or
                          # --out holds another model's or input's embeddings (--overwrite)
EXIT_FAILED = 5           # embedding failed: bad samples past data.max_bad_fraction, ...
EXIT_MODEL = 6            # the model could not be loaded (registry down, no such URI,
                          # a checkpoint that is missing or does not fit the backbone)
EXIT_PREEMPTED = 8        # stopped by SIGTERM / SIGINT: the parts written are kept, rerun resumes


class EmbedExit(Exception):
    """Stop with ``code`` and a one-line ``message``."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def classify(e: BaseException) -> int | None:
    """The exit code for an error an embedding run can meet; None: a bug (show its traceback)."""
    from sslstream.orchestration.embed.manifest import OutputConflict
    from sslstream.orchestration.embed.model import ModelLoadError
    from sslstream.orchestration.embed.store import OutputUnreachable
    from sslstream.orchestration.errors import ConfigError, UserError
    from sslstream.pipelines.shards.errors import DataError
    from sslstream.pipelines.shards.sample import BadDataError
    from sslstream.pipelines.shards.storage import StorageError

    if isinstance(e, EmbedExit):
        return e.code
    if isinstance(e, ConfigError):
        return EXIT_CONFIG
    if isinstance(e, OutputUnreachable | OutputConflict | StorageError | DataError):
        return EXIT_SOURCE
    if isinstance(e, ModelLoadError):  # the loader wraps the registry's errors in it
        return EXIT_MODEL
    if isinstance(e, BadDataError | UserError):
        return EXIT_FAILED
    return None
