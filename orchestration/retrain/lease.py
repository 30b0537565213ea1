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
lease need roughly synchronised clocks (NTP): a taker waits until ``expires_at + grace_s`` by
its own clock, so skew up to ``grace_s`` is absorbed, and a visibly skewed holder (renewal
stamped in the reader's future) is reported. A holder whose renewals fail retries every
``ttl/10`` and gives the lease up ``safety_s = min(ttl/4, 60 s)`` BEFORE its expiry, so it
stops working before anyone may take over. S3 calls are bounded (timeouts, 2 attempts) so a
renewal cannot hang past the expiry. The stores live in orchestration/retrain/stores.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

from sslstream.orchestration.retrain.stores import LeaseStore, LeaseStoreError

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
        # A holder whose renewals fail stops this long BEFORE its expiry (others may take
        # over at expiry + grace_s by their clock): time to stop between two steps.
        self.safety_s = min(self.ttl_s / 4.0, 60.0)

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
            elif LeaseRecord.from_bytes(cur[0], self.store.url).owner == self.owner:
                # our own create landed but its reply was lost and the client retried
                version = cur[1]
            else:
                holder = LeaseRecord.from_bytes(cur[0], self.store.url)
                self._warn_skew(holder)
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

    def _warn_skew(self, holder: LeaseRecord) -> None:
        """Expiry compares the holder's clock with ours: say so when they visibly disagree
        (a renewal stamped in our future means the holder's clock runs ahead)."""
        ahead = holder.renewed_at - self.clock()
        if ahead > max(self.grace_s, 1.0):
            log.warning("lease %s: holder %s stamped its renewal %.0fs in our future; clocks "
                        "are skewed by more than grace_s=%g (sync them with NTP)",
                        self.store.url, holder.owner, ahead, self.grace_s)

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
            if cur is not None and LeaseRecord.from_bytes(cur[0], self.store.url).owner \
                    == self.owner:
                # An earlier renewal of ours landed but its reply was lost (the call failed
                # after the write): the object is still ours; renew against its version.
                version = self.store.replace(rec.to_bytes(), cur[1])
            if version is None:
                self.lost.set()
                raise LeaseLost(f"lease {self.store.url} was taken over: "
                                f"now held by {self._current_holder().owner}")
        self._version, self._record = version, rec

    def start_heartbeat(self, on_lost: Callable[[str], None], interval_s: float | None = None
                        ) -> None:
        """Renew every `interval_s` (default ttl/3) in a daemon thread until release()."""
        interval = interval_s if interval_s is not None else self.ttl_s / 3.0
        retry = min(interval, self.ttl_s / 10.0)

        def beat() -> None:
            wait = interval
            while not self._stop.wait(wait):
                try:
                    self.renew()
                    wait = interval
                except LeaseLost as e:
                    on_lost(str(e))
                    return
                except Exception as e:  # transient store error: retry soon, give up early
                    assert self._record is not None
                    left = self._record.expires_at - self.clock()
                    if left <= self.safety_s:
                        self.lost.set()
                        on_lost(f"lease {self.store.url} could not be renewed and expires in "
                                f"{max(left, 0.0):.0f}s ({e})")
                        return
                    wait = retry
                    log.warning("lease %s: renewal failed (expires in %.0fs), retrying in "
                                "%.1fs: %s", self.store.url, left, wait, e)

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
