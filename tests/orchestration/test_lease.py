"""The retrain lease: mutual exclusion, expiry, takeover, renewal, on a local file system,
on a real S3-compatible server (moto, 127.0.0.1) and on a GCS JSON-API server (127.0.0.1,
tests/fixtures/gcs.py), using each store's conditional writes."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from sslstream.orchestration.retrain.lease import Lease, LeaseHeld, LeaseLost, LeaseRecord
from sslstream.orchestration.retrain.stores import (
    GCSLeaseStore,
    LeaseStoreError,
    LocalLeaseStore,
    S3LeaseStore,
    open_store,
)

from tests.fixtures.gcs import GCS_OPTIONS


class Clock:
    """A hand-driven wall clock, so expiry tests take no real time."""

    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["local", "s3", "gcs"])
def make_store(request, tmp_path: Path):
    """A factory of stores that all point at the same lease object."""
    if request.param == "local":
        path = tmp_path / "locks" / "model.lease"
        return lambda: LocalLeaseStore(path)
    if request.param == "gcs":
        gcs = request.getfixturevalue("gcs")  # tests/fixtures/gcs.py
        gcs.buckets.add("leases")
        url = "gs://leases/data/_sslstream_retrain.model.lease"
        return lambda: GCSLeaseStore(url, dict(GCS_OPTIONS))
    s3 = request.getfixturevalue("s3")  # tests/fixtures/s3.py: moto on 127.0.0.1
    url = f"s3://{s3.bucket('leases')}/data/_sslstream_retrain.model.lease"
    return lambda: S3LeaseStore(url, s3.storage_options)


@pytest.mark.timeout(60)
def test_second_holder_is_refused_while_the_first_is_live(make_store) -> None:
    clock = Clock()
    a = Lease(make_store(), "run-a", ttl_s=60, grace_s=0, clock=clock)
    b = Lease(make_store(), "run-b", ttl_s=60, grace_s=0, clock=clock)
    a.try_acquire()
    assert a.held
    clock.t += 59
    with pytest.raises(LeaseHeld) as e:
        b.try_acquire()
    assert e.value.holder.owner == a.owner
    assert e.value.holder.run_key == "run-a"
    assert "run-a" in str(e.value)
    assert not b.held


@pytest.mark.timeout(60)
def test_expired_lease_is_taken_over_and_the_old_holder_learns_it(make_store) -> None:
    clock = Clock()
    a = Lease(make_store(), "run", ttl_s=60, grace_s=5, clock=clock)
    b = Lease(make_store(), "run", ttl_s=60, grace_s=5, clock=clock)
    a.try_acquire()
    clock.t += 64  # expired but inside the grace period: still a's
    with pytest.raises(LeaseHeld):
        b.try_acquire()
    clock.t += 2
    b.try_acquire()
    assert b.held and b.took_over_from == a.owner
    with pytest.raises(LeaseLost):
        a.renew()
    assert a.lost.is_set() and not a.held
    # a's release must not delete b's lease
    a.release()
    cur = make_store().read()
    assert cur is not None and LeaseRecord.from_bytes(cur[0], "x").owner == b.owner


@pytest.mark.timeout(60)
def test_renewal_pushes_expiry_forward(make_store) -> None:
    clock = Clock()
    a = Lease(make_store(), "run", ttl_s=60, grace_s=0, clock=clock)
    b = Lease(make_store(), "run", ttl_s=60, grace_s=0, clock=clock)
    a.try_acquire()
    for _ in range(3):  # 3 x 50 s = well past the first expiry
        clock.t += 50
        a.renew()
        with pytest.raises(LeaseHeld):
            b.try_acquire()
    rec = LeaseRecord.from_bytes(make_store().read()[0], "x")
    assert rec.expires_at == pytest.approx(clock.t + 60)
    assert rec.acquired_at == pytest.approx(clock.t - 150)
    clock.t += 61
    b.try_acquire()
    assert b.held


@pytest.mark.timeout(60)
def test_release_frees_it_at_once(make_store) -> None:
    a = Lease(make_store(), "run", ttl_s=600)
    b = Lease(make_store(), "run", ttl_s=600)
    a.try_acquire()
    a.release()
    assert make_store().read() is None
    b.try_acquire()
    assert b.held


def _race(make_store, run_key: str, n: int, clock=time.time) -> tuple[list[Lease], list[Lease]]:
    """n threads call try_acquire at the same moment; (winners, refused)."""
    barrier = threading.Barrier(n)
    winners: list[Lease] = []
    refused: list[Lease] = []
    leases = [Lease(make_store(), run_key, ttl_s=600, owner=f"p{i}", clock=clock)
              for i in range(n)]

    def contend(lease: Lease) -> None:
        barrier.wait(timeout=20)
        try:
            lease.try_acquire()
            winners.append(lease)
        except LeaseHeld:
            refused.append(lease)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return winners, refused


@pytest.mark.timeout(60)
def test_concurrent_acquire_has_exactly_one_winner(make_store) -> None:
    for round_ in range(2):
        winners, refused = _race(make_store, f"run-{round_}", 5)
        assert len(winners) == 1 and len(refused) == 4
        cur = make_store().read()
        assert LeaseRecord.from_bytes(cur[0], "x").owner == winners[0].owner
        winners[0].release()


@pytest.mark.timeout(60)
def test_concurrent_takeover_of_an_expired_lease_has_one_winner(make_store) -> None:
    clock = Clock()
    Lease(make_store(), "dead", ttl_s=10, clock=clock).try_acquire()
    clock.t += 100
    winners, refused = _race(make_store, "run", 6, clock=clock)
    assert len(winners) == 1 and len(refused) == 5
    assert winners[0].took_over_from is not None


@pytest.mark.timeout(60)
def test_heartbeat_keeps_a_short_lease_alive_and_reports_loss(make_store) -> None:
    # ttl 2 s: long enough for a loaded 2-core CI machine to renew in time
    a = Lease(make_store(), "run", ttl_s=2.0, grace_s=0)
    a.try_acquire()
    lost: list[str] = []
    a.start_heartbeat(lost.append, interval_s=0.25)
    other = make_store()
    deadline = time.monotonic() + 4.0  # 2 ttl: the lease would have expired without renewal
    while time.monotonic() < deadline:
        with pytest.raises(LeaseHeld):
            Lease(other, "other", ttl_s=2.0, grace_s=0).try_acquire()
        time.sleep(0.3)
    assert not lost
    # someone overwrites the lease (an operator, or a takeover): the heartbeat notices
    store = make_store()
    for _ in range(40):  # the heartbeat may renew between our read and our conditional write
        if store.replace(b'{"owner": "intruder"}', store.read()[1]) is not None:
            break
    else:
        pytest.fail("could not overwrite the lease in 40 read-replace rounds")
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lost and "taken over" in lost[0]
    assert a.lost.is_set()
    a.release()
    assert store.read()[0] == b'{"owner": "intruder"}'  # not deleted by the loser


@pytest.mark.timeout(60)
def test_acquire_waits_for_a_release(make_store) -> None:
    a = Lease(make_store(), "run", ttl_s=600)
    a.try_acquire()
    threading.Timer(0.5, a.release).start()
    b = Lease(make_store(), "run", ttl_s=600)
    t0 = time.monotonic()
    b.acquire(wait_s=120, poll_s=0.1)
    # got it after the release, long before the wait ran out (a loaded machine's server is slow)
    assert b.held and 0.3 < time.monotonic() - t0 < 60
    with pytest.raises(LeaseHeld):
        Lease(make_store(), "run", ttl_s=600).acquire(wait_s=0.3, poll_s=0.1)


def test_garbled_lease_counts_as_expired(tmp_path: Path) -> None:
    path = tmp_path / "x.lease"
    path.write_bytes(b"not json")
    lease = Lease(LocalLeaseStore(path), "run", ttl_s=60)
    lease.try_acquire()
    assert lease.held and lease.took_over_from == "<unreadable>"


def test_open_store_refuses_stores_without_conditional_writes(tmp_path: Path, gcs) -> None:
    assert isinstance(open_store(str(tmp_path / "a.lease")), LocalLeaseStore)
    assert isinstance(open_store(f"file://{tmp_path}/a.lease"), LocalLeaseStore)
    assert isinstance(open_store("gs://bucket/a.lease", dict(GCS_OPTIONS)), GCSLeaseStore)
    for url in ("http://host/a.lease", "memory://a.lease", "az://c/a.lease"):
        with pytest.raises(ValueError, match="retrain.lock.url"):
            open_store(url)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_lease_in_a_missing_bucket_is_an_error_naming_it(request, scheme: str) -> None:
    """Not "held by someone else" (which a scheduler would retry forever): an error naming
    the bucket, which retrain turns into exit 4."""
    url = f"{scheme}://no-such-bucket/model.lease"
    if scheme == "gs":
        request.getfixturevalue("gcs")
        store = GCSLeaseStore(url, dict(GCS_OPTIONS))
    else:
        store = S3LeaseStore(url, request.getfixturevalue("s3").storage_options)
    assert store.read() is None
    with pytest.raises(LeaseStoreError, match="bucket 'no-such-bucket' does not exist"):
        store.create(b"x")
    with pytest.raises(LeaseStoreError, match=f"{scheme}://no-such-bucket/model.lease"):
        Lease(store, "run", ttl_s=60).try_acquire()


@pytest.mark.timeout(60)
def test_gcs_lease_calls_are_bounded_on_a_failing_server(gcs) -> None:
    """A server that answers 503 to everything: one store call gives up after ATTEMPTS
    requests with a LeaseStoreError naming the lease, in seconds, not gcsfs's minute."""
    gcs.buckets.add("leases")
    store = GCSLeaseStore("gs://leases/model.lease", dict(GCS_OPTIONS))
    gcs.fail_all = 503
    t0 = time.monotonic()
    with pytest.raises(LeaseStoreError, match="gs://leases/model.lease"):
        store.create(b"x")
    assert time.monotonic() - t0 < 10
    assert len([r for r in gcs.requests if r.startswith("POST")]) == GCSLeaseStore.ATTEMPTS


@pytest.mark.timeout(60)
def test_store_writes_are_really_conditional(make_store) -> None:
    """The compare-and-swap itself, not the Lease logic: a stale version or an existing
    object must refuse the write and leave the content untouched; two writers racing from
    the same version: exactly one wins (s3: s3fs + moto honour If-Match / If-None-Match)."""
    store = make_store()
    v1 = store.create(b"one")
    assert v1 is not None
    assert make_store().create(b"two") is None  # exists: If-None-Match refuses
    assert store.read() == (b"one", v1)
    v2 = store.replace(b"three", v1)
    assert v2 is not None and v2 != v1
    assert make_store().replace(b"stale", v1) is None  # If-Match on an old version
    assert store.read()[0] == b"three"
    assert not make_store().delete(v1) and store.read()[0] == b"three"
    for round_ in range(3):
        version = store.read()[1]
        barrier = threading.Barrier(4)
        won: list[bytes] = []

        def write(i: int, version: str = version, barrier=barrier, won=won,
                  round_: int = round_) -> None:
            s = make_store()
            barrier.wait(timeout=20)
            data = f"writer-{round_}-{i}".encode()
            if s.replace(data, version) is not None:
                won.append(data)

        threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert len(won) == 1, won
        assert store.read()[0] == won[0]


class FlakyStore:
    """Wraps a store: its next `replace` writes, then fails as if the reply was lost; or every
    `replace` fails before writing (an unreachable store)."""

    def __init__(self, inner) -> None:
        self.inner, self.url = inner, inner.url
        self.lose_reply_once = False
        self.down = False

    def read(self):
        return self.inner.read()

    def create(self, data: bytes):
        return self.inner.create(data)

    def delete(self, version: str) -> bool:
        return self.inner.delete(version)

    def replace(self, data: bytes, version: str):
        from sslstream.orchestration.retrain.stores import LeaseStoreError

        if self.down:
            raise LeaseStoreError(f"store {self.url} unreachable")
        out = self.inner.replace(data, version)
        if self.lose_reply_once:
            self.lose_reply_once = False
            raise LeaseStoreError("connection reset after the write")
        return out


@pytest.mark.timeout(60)
def test_renewal_whose_reply_was_lost_is_still_ours(make_store) -> None:
    clock = Clock()
    flaky = FlakyStore(make_store())
    a = Lease(flaky, "run", ttl_s=60, grace_s=0, clock=clock)
    a.try_acquire()
    clock.t += 20
    flaky.lose_reply_once = True
    with pytest.raises(Exception, match="connection reset"):
        a.renew()  # written, but we never learned the new version
    clock.t += 20
    a.renew()  # must recognise its own record, not report a takeover
    assert a.held and not a.lost.is_set()
    rec = LeaseRecord.from_bytes(make_store().read()[0], "x")
    assert rec.owner == a.owner and rec.expires_at == clock.t + 60


@pytest.mark.timeout(60)
def test_holder_that_cannot_renew_gives_up_before_its_expiry(tmp_path: Path) -> None:
    flaky = FlakyStore(LocalLeaseStore(tmp_path / "m.lease"))
    a = Lease(flaky, "run", ttl_s=2.0, grace_s=0)
    a.try_acquire()
    expires_at = LeaseRecord.from_bytes(flaky.read()[0], "x").expires_at
    flaky.down = True
    lost: list[tuple[float, str]] = []
    a.start_heartbeat(lambda why: lost.append((time.time(), why)), interval_s=0.5)
    deadline = time.monotonic() + 10
    while not lost and time.monotonic() < deadline:
        time.sleep(0.02)
    a.release()
    assert lost and "could not be renewed" in lost[0][1]
    # stopped before anyone else could take over (expiry + grace by a synced clock)
    assert lost[0][0] < expires_at - a.safety_s / 2
    assert a.lost.is_set() and not a.held


@pytest.mark.timeout(60)
def test_s3_lease_calls_on_a_hung_store_are_bounded() -> None:
    """A store that accepts connections and never answers: a lease call must fail soon
    (timeouts, few tries) so the heartbeat can give up before the expiry, not sit in
    s3fs's and botocore's retry loops (5 x 5 tries by default)."""
    import socket

    from sslstream.orchestration.retrain.stores import LeaseStoreError

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)  # accepted by the kernel, never read or answered
    try:
        url = "s3://bucket/x/_sslstream_retrain.m.lease"
        opts = {"key": "k", "secret": "s",
                "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{srv.getsockname()[1]}",
                                  "region_name": "us-east-1"},
                "config_kwargs": {"read_timeout": 1, "connect_timeout": 1}}
        store = S3LeaseStore(url, opts)
        t0 = time.monotonic()
        with pytest.raises(LeaseStoreError, match="_sslstream_retrain.m.lease"):
            store.read()
        assert time.monotonic() - t0 < 20  # ~6 s here; s3fs + botocore defaults: ~45 s
    finally:
        srv.close()
