"""Reader processes (pipelines/views/workers.py, pipelines/shards/lanes.py): same batches
whatever their number, errors with their type, dead workers reported (never a hang), and no
orphan after close, SIGTERM, Ctrl-C or SIGKILL of the trainer process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from sslstream.orchestration.schema import augment_recipe
from sslstream.pipelines.shards.procs import WorkerError
from sslstream.pipelines.shards.stream import BadDataError, ShardStream
from sslstream.pipelines.views.loader import TwoViewLoader

from tests.pipelines.augment_helpers import FakeStream, make_samples

RECIPE = augment_recipe("byol_cifar")
ROOT = Path(__file__).resolve().parents[2]


class BrokenStream(FakeStream):
    """Fails after 3 samples with a storage-like error (module level: picklable)."""

    def __iter__(self):
        yield from list(super().__iter__())[:3]
        raise OSError("s3://bucket/shard-000003.tar: connection reset")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


@pytest.mark.timeout(120)
def test_same_batches_whatever_the_number_of_workers(shard_factory):
    """0, 1 and 3 workers (3 = reader + 2 lane processes for 3 lanes) give the same batches,
    bit for bit, over two epochs of shards with corrupt members and a truncated shard."""
    shards = shard_factory([13, 9, 17, 11], corrupt={(0, 2): "bad_header", (2, 5): "empty"},
                           truncate={3: 0.6})
    out = {}
    for workers in (0, 1, 3):
        stream = ShardStream(shards.urls, num_workers=3, seed=2, shuffle_buffer=8,
                             max_bad_fraction=0.3)
        with TwoViewLoader(stream, RECIPE, batch_size=5, device="cpu", backend="torchvision",
                           seed=4, workers=workers) as loader:
            got = []
            for epoch in range(2):
                loader.set_epoch(epoch)
                got += [(b.keys, b.view1, b.view2) for b in loader]
            out[workers] = (got, loader.counters)
    ref, counters = out[0]
    assert len(ref) == 2 * len(loader)
    for workers in (1, 3):
        got, c = out[workers]
        assert [g[0] for g in got] == [r[0] for r in ref]
        assert all(torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])
                   for a, b in zip(got, ref, strict=True))
        assert c["skipped_corrupt"] >= 2 and c["truncated_shards"] >= 1  # counted in the worker


@pytest.mark.timeout(60)
@pytest.mark.parametrize("workers", [1, 2])
def test_errors_in_workers_surface_with_their_type(workers, shard_factory):
    with (TwoViewLoader(BrokenStream(make_samples(16)), RECIPE, batch_size=2, device="cpu",
                        backend="torchvision", workers=workers) as loader,
          pytest.raises(OSError, match="shard-000003")):
        list(loader)
    # too much corrupt data: the stream's BadDataError, raised in the lane / reader process
    shards = shard_factory([6, 6], corrupt={(0, i): "bad_header" for i in range(4)})
    stream = ShardStream(shards.urls, num_workers=2, max_bad_fraction=0.1)
    with (TwoViewLoader(stream, RECIPE, batch_size=2, device="cpu", backend="torchvision",
                        workers=workers) as loader,
          pytest.raises(BadDataError, match="max_bad_fraction")):
        list(loader)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("victim", [0, 1])  # the reader process, a lane process
def test_a_killed_worker_is_reported_not_waited_on(victim, shard_factory):
    shards = shard_factory([40, 40])
    stream = ShardStream(shards.urls, num_workers=2, shuffle_buffer=4)
    loader = TwoViewLoader(FakeStream(make_samples(400), delay_s=0.005) if victim == 0 else stream,
                           RECIPE, batch_size=4, device="cpu", backend="torchvision",
                           workers=2, prefetch=1)
    try:
        it = iter(loader)
        next(it)
        pids = loader.worker_pids
        os.kill(pids[victim], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerError, match=rf"{pids[victim]}.*died"):
            for _ in it:
                time.sleep(0.01)
            for epoch in (1, 2):  # a lane process may have read its whole share ahead
                loader.set_epoch(epoch)
                list(loader)
        assert time.monotonic() - t0 < 20
    finally:
        loader.close()
    assert _wait_gone(pids) == []


_CHILD = """
import sys, time
from sslstream.pipelines.shards.stream import ShardStream
from sslstream.pipelines.views.loader import TwoViewLoader
from sslstream.orchestration.schema import augment_recipe
stream = ShardStream(sys.argv[1:], num_workers=2, shuffle_buffer=4)
loader = TwoViewLoader(stream, augment_recipe("byol_cifar"), batch_size=4, device="cpu",
                       backend="torchvision", workers=3, prefetch=1)
epoch = 0
while True:
    loader.set_epoch(epoch)
    for i, b in enumerate(loader):
        if epoch == 0 and i == 0:
            print("PIDS", *loader.worker_pids, flush=True)
        time.sleep(0.05)
    epoch += 1
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_no_orphans_when_the_trainer_process_is_stopped(sig, shard_factory):
    """A training process with a reader and two lane processes gets SIGTERM (no handler:
    dies at once), Ctrl-C (KeyboardInterrupt, interpreter exit) or SIGKILL: every worker is
    gone within seconds, none is left running under init."""
    shards = shard_factory([30, 30, 30])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *shards.urls], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), (line, proc.stderr.read()[-2000:] if proc.poll() else "")
        pids = [int(x) for x in line.split()[1:]]
        assert len(pids) == 3 and all(_alive(p) for p in pids)
        time.sleep(0.5)
        proc.send_signal(getattr(signal, sig))
        proc.wait(timeout=30)
        assert _wait_gone(pids, timeout=10) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
