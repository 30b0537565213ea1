"""Where a lease lives: compare-and-swap stores for local files and S3 (see lease.py).

Each store keeps one small object and offers create-if-absent, replace-if-version and
delete-if-version; versions are opaque (sha256 of the content locally, the ETag on S3).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol


class LeaseStoreError(RuntimeError):
    """The lease object cannot be read or written (permissions, unreachable store)."""


class LeaseStore(Protocol):
    """Compare-and-swap storage of one small object. Versions are opaque tokens."""

    url: str

    def read(self) -> tuple[bytes, str] | None:
        """Content and version, or None when absent."""

    def create(self, data: bytes) -> str | None:
        """Write only if absent; the new version, or None when it already exists."""

    def replace(self, data: bytes, version: str) -> str | None:
        """Write only if the current version is `version`; the new version, or None."""

    def delete(self, version: str) -> bool:
        """Delete only if the current version is `version`."""


class LocalLeaseStore:
    """A lease file on a local (POSIX) file system."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self._guard = self.path.with_name(self.path.name + ".guard")

    @staticmethod
    def _version(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self._guard, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise LeaseStoreError(f"cannot open lease guard {self._guard}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def read(self) -> tuple[bytes, str] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise LeaseStoreError(f"cannot read lease {self.path}: {e}") from e
        return data, self._version(data)

    def _write_tmp(self, data: bytes) -> Path:
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> str | None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self._write_tmp(data)
        except OSError as e:
            raise LeaseStoreError(f"cannot write next to lease {self.path}: {e}") from e
        try:
            with self._locked():
                os.link(tmp, self.path)  # atomic; EEXIST when someone holds it
            return self._version(data)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked():
            cur = self.read()
            if cur is None or cur[1] != version:
                return None
            tmp = self._write_tmp(data)
            os.replace(tmp, self.path)
        return self._version(data)

    def delete(self, version: str) -> bool:
        with self._locked():
            cur = self.read()
            if cur is None or cur[1] != version:
                return False
            self.path.unlink()
        return True


class S3LeaseStore:
    """A lease object in an S3 (or S3-compatible) bucket, via s3fs conditional writes."""

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        import s3fs  # lazy: only S3 users need it

        from pipelines.storage import resolve_storage_options  # endpoint from AWS_ENDPOINT_URL

        self.url = url
        opts = resolve_storage_options(url, storage_options)
        opts.setdefault("skip_instance_cache", True)
        # Bounded calls: a renewal stuck in retries past the expiry would let another holder
        # take over while we still train. s3fs retries 5x by default, botocore 4-5 attempts.
        config = dict(opts.get("config_kwargs") or {})
        # Measured on a hung endpoint: one s3fs try costs ~2 x read_timeout, so a call ends
        # within ~2 x 2 x 10 s = 40 s (+ connect), inside the holder's safety margin
        # min(ttl/4, 60 s) at the default ttl_s=300. A lease object is tiny: 10 s is plenty.
        config.setdefault("connect_timeout", 10)
        config.setdefault("read_timeout", 10)
        config.setdefault("retries", {"max_attempts": 1, "mode": "standard"})
        opts["config_kwargs"] = config
        self.fs = s3fs.S3FileSystem(**opts)
        self.fs.retries = 2  # s3fs's own retry loop (a class attribute, default 5)
        self.bucket, self.key, _ = self.fs.split_path(url)

    def _call(self, method: str, **kwargs) -> dict:
        """One S3 call on s3fs's loop; the body (if any) read into bytes under "Data"."""
        from fsspec.asyn import sync

        async def call() -> dict:
            out = await self.fs._call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)
            if "Body" in out:
                async with out["Body"] as stream:
                    out["Data"] = await stream.read()
            return out

        try:
            return sync(self.fs.loop, call)
        except (FileNotFoundError, FileExistsError):
            raise
        except OSError as e:
            if _is_condition_failure(e):
                raise _PreconditionFailed(str(e)) from e
            raise LeaseStoreError(f"S3 {method} on lease {self.url} failed: {e}") from e
        except Exception as e:  # botocore connection errors and the like
            raise LeaseStoreError(f"S3 {method} on lease {self.url} failed: {e}") from e

    def read(self) -> tuple[bytes, str] | None:
        try:
            out = self._call("get_object")
        except FileNotFoundError:
            return None
        return out["Data"], out["ETag"]

    def create(self, data: bytes) -> str | None:
        try:
            return self._call("put_object", Body=data, IfNoneMatch="*")["ETag"]
        except (FileExistsError, _PreconditionFailed):
            return None

    def replace(self, data: bytes, version: str) -> str | None:
        try:
            return self._call("put_object", Body=data, IfMatch=version)["ETag"]
        except (FileNotFoundError, _PreconditionFailed):
            return None

    def delete(self, version: str) -> bool:
        cur = self.read()  # conditional DeleteObject is not in every S3 clone: check first
        if cur is None or cur[1] != version:
            return False
        self._call("delete_object")
        return True


class _PreconditionFailed(Exception):
    pass


# 412: the If-Match / If-None-Match condition did not hold; 409 ConditionalRequestConflict:
# AWS's answer when conditional writes to one key race (the other writer won).
_CONDITION_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


def _is_condition_failure(e: BaseException) -> bool:
    """Whether s3fs's translated OSError stands for a failed write condition."""
    response = getattr(e.__cause__, "response", None) or {}
    code = str((response.get("Error") or {}).get("Code", ""))
    status = str((response.get("ResponseMetadata") or {}).get("HTTPStatusCode", ""))
    return code in _CONDITION_CODES or status in ("412", "409") or (
        "pre-condition" in str(e).lower() or "precondition" in str(e).lower())


def open_store(url: str, storage_options: dict | None = None) -> LeaseStore:
    """A lease store for `url`: s3://... or a local path / file://... ."""
    if url.startswith("s3://"):
        return S3LeaseStore(url, storage_options)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        raise ValueError(
            f"retrain.lock.url={url!r}: leases need atomic conditional writes, available "
            "here for s3:// and local paths; point retrain.lock.url at one of those"
        )
    return LocalLeaseStore(url)
