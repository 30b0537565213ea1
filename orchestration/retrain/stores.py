"""Where a lease lives: compare-and-swap stores for local files, S3 and GCS (see lease.py).

Each store keeps one small object and offers create-if-absent, replace-if-version and
delete-if-version; versions are opaque (sha256 of the content locally, the ETag on S3, the
object generation on GCS).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time
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
        from sslstream.pipelines.shards.storage import (
            resolve_storage_options,  # endpoint from AWS_ENDPOINT_URL
        )

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
        except FileNotFoundError:  # a PutObject 404 is NoSuchBucket
            raise LeaseStoreError(f"cannot write lease {self.url}: bucket {self.bucket!r} "
                                  "does not exist") from None

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


class GCSLeaseStore:
    """A lease object in a Google Cloud Storage bucket, via generation preconditions.

    GCS makes every write conditional on `ifGenerationMatch`: 0 means "only if absent", a
    generation means "only if that is still the live version", and a failed condition is
    HTTP 412. Calls go through gcsfs's session and credentials but not its retry loop
    (six tries with sleeps growing to 16 s: over a minute on a hung endpoint, longer than
    the holder's safety margin min(ttl/4, 60 s)); here a call makes at most `ATTEMPTS`
    requests of at most `requests_timeout` (10 s) each, ~32 s in all.
    """

    ATTEMPTS = 3

    def __init__(self, url: str, storage_options: dict | None = None) -> None:
        from sslstream.pipelines.shards.storage import gcs_emulator_defaults

        gcs_emulator_defaults()
        import gcsfs  # lazy: only GCS users need it
        from gcsfs.core import quote

        self.url = url
        opts = dict(storage_options or {})
        opts.setdefault("skip_instance_cache", True)
        opts.setdefault("requests_timeout", 10)
        self.fs = gcsfs.GCSFileSystem(**opts)
        self.bucket, self.key, _ = self.fs.split_path(url)
        self._object = f"b/{quote(self.bucket)}/o/{quote(self.key)}"
        self._upload = f"{self.fs._location}/upload/storage/v1/b/{quote(self.bucket)}/o"
        # the undecorated request (gcsfs wraps it in its own retries); a gcsfs without it
        # keeps working, with gcsfs's longer retry loop
        request = type(self.fs)._request
        self._request = getattr(request, "__wrapped__", request)

    def _call(self, method: str, path: str, **params) -> tuple[dict, bytes]:
        """One request, retried on 5xx / 408 / 429 / transport errors; 404 and 412 raise
        FileNotFoundError and FileExistsError (gcsfs's mapping) for the callers."""
        from fsspec.asyn import sync
        from sslstream.pipelines.shards.storage import classify

        for attempt in range(self.ATTEMPTS):
            try:
                _, headers, _, body = sync(self.fs.loop, self._request, self.fs, method, path,
                                           **params)
                return dict(headers), body
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as e:
                if classify(e) != "transient" or attempt == self.ATTEMPTS - 1:
                    raise LeaseStoreError(f"GCS {method} on lease {self.url} failed: "
                                          f"{type(e).__name__}: {e}") from e
                time.sleep(0.5 * 2**attempt)
        raise AssertionError("unreachable")

    def read(self) -> tuple[bytes, str] | None:
        for _ in range(self.ATTEMPTS):
            try:
                _, meta = self._call("GET", f"{self.fs.base}{self._object}")
            except FileNotFoundError:
                return None  # no lease object (a missing bucket shows at the first write)
            generation = str(json.loads(meta)["generation"])
            try:
                _, data = self._call("GET", self.fs.url(f"{self.bucket}/{self.key}",
                                                        generation=generation))
            except FileNotFoundError:
                continue  # replaced or deleted between the two requests: look again
            return data, generation
        raise LeaseStoreError(f"lease {self.url} kept changing while being read "
                              f"({self.ATTEMPTS} tries)")

    def _write(self, data: bytes, if_generation: str) -> str | None:
        try:
            _, meta = self._call("POST", self._upload, uploadType="media", name=self.key,
                                 ifGenerationMatch=if_generation, data=data,
                                 headers={"Content-Type": "application/json"})
        except FileExistsError:  # 412: the condition did not hold
            return None
        except FileNotFoundError:  # GCS answers 404 to an upload only for a missing bucket
            raise LeaseStoreError(f"cannot write lease {self.url}: bucket {self.bucket!r} "
                                  "does not exist") from None
        return str(json.loads(meta)["generation"])

    def create(self, data: bytes) -> str | None:
        return self._write(data, "0")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._write(data, version)

    def delete(self, version: str) -> bool:
        try:
            self._call("DELETE", f"{self.fs.base}{self._object}", ifGenerationMatch=version)
        except (FileExistsError, FileNotFoundError):
            return False
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
    """A lease store for `url`: s3://..., gs://... or a local path / file://... ."""
    if url.startswith("s3://"):
        return S3LeaseStore(url, storage_options)
    if url.startswith(("gs://", "gcs://")):
        return GCSLeaseStore(url, storage_options)
    if url.startswith("file://"):
        url = url[len("file://") :]
    if "://" in url:
        raise ValueError(
            f"retrain.lock.url={url!r}: leases need atomic conditional writes, available "
            "here for s3://, gs:// and local paths; point retrain.lock.url at one of those"
        )
    return LocalLeaseStore(url)
