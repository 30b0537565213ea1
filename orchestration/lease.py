"""A lease (a lock with an expiry) kept as one small object next to the data.

Why a lease and not a plain lock: schedulers (cron, Kubernetes CronJobs, Airflow) start
`sslstream retrain` on machines that share nothing but the bucket. Two of them must never
train the same model at once, and a holder that died (SIGKILL, lost node) must not block
the next run forever. So the lock is an object that records who holds it and until when;
the holder renews it (heartbeat) while it works, and anyone may take it over once it has
expired.

Every write is a compare-and-swap, so two processes can never both believe they won:

- create: S3 ``PutObject`` with ``If-None-Match: *`` (conditional writes, 2024; moto
  supports it); local files: the content is written to a private temp file and
  ``os.link``-ed into place, which fails atomically when the name exists (the O_EXCL idea,
  with the content complete before anyone can see it).
- renew / take over: S3 ``PutObject`` with ``If-Match: <etag read>``; local files: compare
  and ``os.replace`` under an ``fcntl.flock`` on a guard file.

Expiry uses the writer's wall clock (``expires_at`` in the record), so machines that share a
lease need roughly synchronised clocks (NTP); ``grace_s`` absorbs small skew.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class LeaseHeld(RuntimeError):
    """Another live holder has the lease."""

    def __init__(self, url: str, holder: LeaseRecord) -> None:
        left = max(0.0, holder.expires_at - time.time())
        super().__init__(
            f"lease {url} is held by {holder.owner} (run {holder.run_key or '?'}) "
            f"for another {left:.0f}s unless renewed"
        )
        self.holder = holder


class LeaseLost(RuntimeError):
    """We held the lease and no longer do (taken over after expiry, or deleted)."""


class LeaseStoreError(RuntimeError):
    """The lease object cannot be read or written (permissions, unreachable store)."""


@dataclass(frozen=True)
class LeaseRecord:
    """What the lease object holds (JSON)."""

    owner: str  # unique per acquisition: host:pid:random
    run_key: str
    acquired_at: float
    renewed_at: float
    expires_at: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, url: str) -> LeaseRecord:
        try:
            raw = json.loads(data)
            return cls(**{k: raw[k] for k in cls.__dataclass_fields__})
        except (ValueError, KeyError, TypeError) as e:
            # A garbled lease cannot name a live holder: treat it as expired (version-checked
            # takeover still protects against a concurrent writer).
            log.warning("lease %s is unreadable (%s): treating it as expired", url, e)
            return cls("<unreadable>", "", 0.0, 0.0, 0.0, 0.0)


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
        self.fs = s3fs.S3FileSystem(**opts)
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
            if "pre-condition" in str(e).lower() or "precondition" in str(e).lower():
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


def new_owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """One acquisition of a lease: acquire, renew (heartbeat thread), release.

    `on_lost` is called (from the heartbeat thread) when renewal finds the lease taken by
    someone else, or when it could not be renewed before it expired: the caller must stop
    working, since another holder may now be doing the same work.
    """

    def __init__(self, store: LeaseStore, run_key: str, *, ttl_s: float = 300.0,
                 grace_s: float = 5.0, owner: str | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if ttl_s <= 0:
            raise ValueError(f"retrain.lock.ttl_s must be > 0, got {ttl_s}")
        self.store, self.run_key, self.ttl_s, self.grace_s = store, run_key, ttl_s, grace_s
        self.owner = owner or new_owner_id()
        self.clock = clock
        self._version: str | None = None
        self._record: LeaseRecord | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = threading.Event()
        self.took_over_from: str | None = None

    @property
    def held(self) -> bool:
        return self._version is not None and not self.lost.is_set()

    def _record_now(self, acquired_at: float | None = None) -> LeaseRecord:
        now = self.clock()
        return LeaseRecord(self.owner, self.run_key, acquired_at or now, now,
                           now + self.ttl_s, self.ttl_s)

    def try_acquire(self) -> None:
        """Acquire now or raise LeaseHeld (live holder) / LeaseStoreError."""
        rec = self._record_now()
        version = self.store.create(rec.to_bytes())
        if version is None:
            cur = self.store.read()
            if cur is None:  # released between our create and read: one more try
                version = self.store.create(rec.to_bytes())
                if version is None:
                    raise LeaseHeld(self.store.url, self._current_holder())
            elif cur[0] == rec.to_bytes():
                # our own create landed but its reply was lost and the client retried
                version = cur[1]
            else:
                holder = LeaseRecord.from_bytes(cur[0], self.store.url)
                if self.clock() <= holder.expires_at + self.grace_s:
                    raise LeaseHeld(self.store.url, holder)
                version = self.store.replace(rec.to_bytes(), cur[1])
                if version is None:  # someone else took it over first
                    raise LeaseHeld(self.store.url, self._current_holder())
                self.took_over_from = holder.owner
                log.warning("lease %s: took over from %s (expired %.0fs ago)",
                            self.store.url, holder.owner, self.clock() - holder.expires_at)
        self._version, self._record = version, rec
        self.lost.clear()

    def _current_holder(self) -> LeaseRecord:
        cur = self.store.read()
        if cur is None:
            return LeaseRecord("<released>", "", 0.0, 0.0, 0.0, 0.0)
        return LeaseRecord.from_bytes(cur[0], self.store.url)

    def acquire(self, wait_s: float = 0.0, poll_s: float = 1.0) -> None:
        """try_acquire, retrying for up to `wait_s` seconds while another holder has it."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self.try_acquire()
            except LeaseHeld:
                if time.monotonic() + poll_s > deadline:
                    raise
            time.sleep(poll_s)

    def renew(self) -> None:
        """Extend the expiry (compare-and-swap). Raises LeaseLost when no longer ours."""
        if self._version is None or self._record is None:
            raise LeaseLost(f"lease {self.store.url} is not held by {self.owner}")
        rec = self._record_now(self._record.acquired_at)
        version = self.store.replace(rec.to_bytes(), self._version)
        if version is None:
            cur = self.store.read()
            if cur is not None and cur[0] == rec.to_bytes():  # landed; reply lost
                self._version, self._record = cur[1], rec
                return
            self.lost.set()
            raise LeaseLost(f"lease {self.store.url} was taken over: "
                            f"now held by {self._current_holder().owner}")
        self._version, self._record = version, rec

    def start_heartbeat(self, on_lost: Callable[[str], None], interval_s: float | None = None
                        ) -> None:
        """Renew every `interval_s` (default ttl/3) in a daemon thread until release()."""
        interval = interval_s if interval_s is not None else self.ttl_s / 3.0

        def beat() -> None:
            while not self._stop.wait(interval):
                try:
                    self.renew()
                except LeaseLost as e:
                    on_lost(str(e))
                    return
                except Exception as e:  # transient store error: retry until expiry
                    assert self._record is not None
                    if self.clock() >= self._record.expires_at:
                        self.lost.set()
                        on_lost(f"lease {self.store.url} expired: could not renew ({e})")
                        return
                    log.warning("lease %s: renewal failed, will retry: %s", self.store.url, e)

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still ours."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
        if self._version is not None and not self.lost.is_set():
            try:
                self.store.delete(self._version)
            except LeaseStoreError as e:  # it will expire on its own
                log.warning("lease %s: release failed (%s); it expires in <= %.0fs",
                            self.store.url, e, self.ttl_s)
        self._version = None
