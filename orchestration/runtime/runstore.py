"""A run's folder (`trainer.output_dir`/`run_name`) on any store fsspec reaches.

Everything a run keeps between processes lives here: checkpoints and their manifests
(orchestration/runtime/checkpoint.py), the registered marker (orchestration/train/runlog.py).
The folder may be a local path, `file://`, `s3://`, `gs://` or any other fsspec URL; a
local path never goes through URL parsing, so `s3://b/runs` is never mistaken for a local
folder named `s3:`.

Every call is bounded and retried on transient store errors (503 SlowDown, reset
connections; pipelines/shards/storage.py: `with_retries`), and every permanent error is a
`StorageError` naming the URL with any credentials in it masked (pipelines/shards/masking.py). A whole object is
written in one piece: locally to a temporary file renamed into place (atomic on POSIX),
on an object store with one PUT (S3 and GCS never show a partial object).
"""

from __future__ import annotations

import contextlib
import copy
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any

from sslstream.pipelines.shards.masking import mask
from sslstream.pipelines.shards.storage import (
    RetryPolicy,
    StorageError,
    get_fs,
    with_retries,
)

__all__ = ["RunStore", "is_local_url"]

TEMP_PREFIX = ".tmp-"


def is_local_url(url: str) -> bool:
    """A plain path or a `file://` URL (the local file system)."""
    return "://" not in url or url.startswith("file://")


class RunStore:
    """One folder on one store: list, read, write whole objects, delete; see the module
    docstring. `url` is what messages show (credentials masked)."""

    def __init__(self, url: str | Path, storage_options: dict | None = None, *,
                 policy: RetryPolicy | None = None) -> None:
        text = str(url)
        self.local = is_local_url(text)
        if self.local:
            text = str(Path(text.removeprefix("file://")).expanduser().absolute())
        self._raw = text.rstrip("/") or "/"
        self.url = mask(self._raw)  # what messages show (pipelines/shards/masking.py)
        self.policy = policy or RetryPolicy()
        try:
            self.fs, self.root = get_fs(self._raw, storage_options)
        except StorageError:
            raise
        except Exception as e:  # a malformed URL or options the backend refuses
            raise StorageError(f"{self.url}: cannot open this store: {type(e).__name__}: "
                               f"{mask(str(e))}", self.url) from None
        self.root = self.root.rstrip("/") or "/"

    @classmethod
    def for_run(cls, output_dir: str, run_name: str, storage_options: dict | None = None
                ) -> RunStore:
        """`output_dir`/`run_name` (a URL's path joined with '/', a local path with the OS)."""
        base = str(output_dir)
        joined = (str(Path(base.removeprefix("file://")).expanduser() / run_name)
                  if is_local_url(base) else f"{base.rstrip('/')}/{run_name}")
        return cls(joined, storage_options)

    def __repr__(self) -> str:
        return f"RunStore({self.url!r})"

    def url_of(self, name: str) -> str:
        """The URL (masked) of the object `name` in this folder."""
        return f"{self.url}/{name}"

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def _retry(self, fn: Any, name: str, what: str) -> Any:
        return with_retries(fn, self.url_of(name) if name else self.url, what=what,
                            policy=self.policy)

    # --- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Names of the objects directly in the folder ([] when it does not exist)."""
        def op() -> list[str]:
            self.fs.invalidate_cache(self.root)  # another process may have written since
            try:
                entries = self.fs.ls(self.root, detail=False)
            except FileNotFoundError:
                return []
            return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in entries]

        return self._retry(op, "", "listing")

    def read_bytes(self, name: str) -> bytes:
        return self._retry(lambda: self.fs.cat_file(self._path(name)), name, "reading")

    # --- writing -------------------------------------------------------------------------

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write the whole object at once (see the module docstring), retried."""
        if self.local:
            self._retry(lambda: self._write_local(name, data), name, "writing")
        else:
            self._retry(lambda: self.fs.pipe_file(self._path(name), data), name, "writing")

    def _write_local(self, name: str, data: bytes) -> None:
        write_atomic_local(Path(self.root), name, data)

    def delete(self, name: str) -> None:
        """Remove `name` (absent already: nothing to do)."""
        def op() -> None:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(name))

        self._retry(op, name, "deleting")

    def size(self, name: str) -> int:
        return int(self._retry(lambda: self.fs.size(self._path(name)), name, "checking"))

    def check_writable(self) -> None:
        """Write, read back and delete a small object: a store that refuses us, or cannot be
        reached, fails here (a StorageError naming the URL) instead of at the first
        checkpoint. Fewer retries than a checkpoint write: this runs before the first step."""
        name = f"{TEMP_PREFIX}write-check-{uuid.uuid4().hex[:12]}"  # litter if we are killed
        payload = b"sslstream write check"
        quick = copy.copy(self)
        quick.policy = RetryPolicy(attempts=3, base_delay=0.2, max_delay=1.0)
        quick.write_bytes(name, payload)
        try:
            if quick.read_bytes(name) != payload:
                raise StorageError(f"{self.url}: an object written there reads back "
                                   "different bytes", self.url)
        finally:
            quick.delete(name)


def write_atomic_local(folder: Path, name: str, data: bytes) -> None:
    """Write ``folder/name`` so that a reader sees the old file or the whole new one, never a
    part: a temporary file (``TEMP_PREFIX``: litter a killed writer leaves, which the next run
    removes), fsync, rename, fsync of the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _fsync_dir(d: Path) -> None:
    """Make a rename durable (POSIX); harmless where directories cannot be opened."""
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
