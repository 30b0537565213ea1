"""Mid-epoch resume: a cursor restored in a NEW process continues exactly where the
uninterrupted stream would have gone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sslstream.pipelines.shards.stream import ShardStream

from tests.fixtures.shards import ShardSet

REPO = Path(__file__).resolve().parents[2]

# The child: build the same stream, restore each cursor, return the next `take` keys.
CHILD = """
import json, sys
from sslstream.pipelines.shards.stream import ShardStream
job = json.load(sys.stdin)
out = []
for state in job["states"]:
    s = ShardStream(job["urls"], **job["kw"])
    s.load_state_dict(state)
    s.set_epoch(state["epoch"])  # what a trainer does at the top of the resumed epoch
    keys = []
    for x in s:
        keys.append(x.key)
        if len(keys) == job["take"]:
            break
    out.append({"keys": keys, **s.counters})
print(json.dumps(out))
"""


def _run_child(urls: str, kw: dict, states: list[dict], take: int) -> list[dict]:
    r = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(
        {"urls": urls, "kw": kw, "states": states, "take": take}), cwd=REPO,
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout)


def _cursors(urls: str, kw: dict, epoch: int, ks: list[int]) -> tuple[list[str], list[dict]]:
    """The uninterrupted epoch's keys, and the cursor taken after each k samples."""
    s = ShardStream(urls, **kw)
    s.set_epoch(epoch)
    keys, states = [], {}
    for x in s:
        keys.append(x.key)
        if len(keys) in ks:
            states[len(keys)] = s.state_dict()
    return keys, [states[k] for k in ks]


@pytest.mark.timeout(120)
def test_resume_in_a_new_process_inside_shards_and_at_boundaries(uneven_shards: ShardSet) -> None:
    root = str(uneven_shards.root)
    take = 12
    # Shuffled, 2 ranks x 2 workers: k inside the shuffle buffer's warm-up, mid-epoch, late.
    kw = {"rank": 1, "world_size": 2, "num_workers": 2, "seed": 5, "shuffle_buffer": 8,
          "exact_epoch": True}
    ks = [1, 7, 19]
    keys, states = _cursors(root, kw, 2, ks)
    # Unshuffled, 1 worker: the output is in tar order, so the shard boundaries are known.
    kw2 = {"num_workers": 1, "shuffle": False}
    s = ShardStream(root, **kw2)
    first = s.segments()[0]
    boundary = len(first)  # the first shard ends here: the next sample opens a new shard
    ks2 = [boundary - 1, boundary, boundary + 1]
    keys2, states2 = _cursors(root, kw2, 0, ks2)
    got = _run_child(root, kw, states, take)
    for k, g in zip(ks, got, strict=True):
        assert g["keys"] == keys[k : k + take], f"resume after {k} samples"
        assert g["fast_forwarded"] == k and g["replayed"] == 0
    got2 = _run_child(root, kw2, states2, take)
    for k, g in zip(ks2, got2, strict=True):
        assert g["keys"] == keys2[k : k + take], f"resume after {k} samples (shard boundary {boundary})"
    assert keys2[boundary - 1].startswith(f"shard{first.shard:02d}_")
    assert not keys2[boundary].startswith(f"shard{first.shard:02d}_")


def test_cursor_semantics_in_process(uneven_shards: ShardSet) -> None:
    root = str(uneven_shards.root)
    kw = {"num_workers": 2, "seed": 1, "shuffle_buffer": 4, "world_size": 2, "rank": 0}
    s = ShardStream(root, **kw)
    full0 = [x.key for x in s]
    s.set_epoch(1)
    it = iter(s)
    head = [next(it).key for _ in range(5)]
    it.close()  # abandoned mid-epoch: the next iteration resumes from the cursor
    st = s.state_dict()
    assert (st["epoch"], st["position"]) == (1, 5)
    rest = [x.key for x in s]
    t = ShardStream(root, **kw)
    t.set_epoch(1)
    full1 = [x.key for x in t]
    assert head + rest == full1 and full1 != full0
    # A prefetching consumer saves what it really consumed.
    assert s.state_dict(position=3)["position"] == 3
    u = ShardStream(root, **kw)
    u.load_state_dict(s.state_dict(position=3))
    u.set_epoch(1)  # same epoch: keeps the restored position
    assert [x.key for x in u] == full1[3:]
    u.set_epoch(2)  # a new epoch starts at 0
    assert u.state_dict()["position"] == 0
    # After a complete pass the same epoch starts over.
    assert [x.key for x in t] == full1


def test_stream_pickles_with_its_cursor(uneven_shards: ShardSet) -> None:
    import pickle

    s = ShardStream(str(uneven_shards.root), num_workers=2, seed=3, shuffle_buffer=4)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it).key for _ in range(7)]
    it.close()
    u = ShardStream(str(uneven_shards.root), num_workers=2, seed=3, shuffle_buffer=4)
    u.set_epoch(2)
    assert head + [x.key for x in pickle.loads(pickle.dumps(s))] == [x.key for x in u]


def test_cursor_from_another_stream_is_refused(uneven_shards: ShardSet) -> None:
    root = str(uneven_shards.root)
    st = ShardStream(root, seed=1).state_dict()
    with pytest.raises(ValueError, match="does not match this stream"):
        ShardStream(root, seed=2).load_state_dict(st)
    with pytest.raises(ValueError, match="rank/world_size 0/2"):
        ShardStream(root, world_size=2).load_state_dict(st)


@pytest.mark.timeout(120)
def test_resume_on_cifar10_gz_shards_in_a_new_process(cifar10_dir: Path) -> None:
    urls = f"{cifar10_dir}#test"
    kw = {"rank": 0, "world_size": 2, "num_workers": 2, "seed": 11, "shuffle_buffer": 256,
          "exact_epoch": True}
    ks = [1234, 4999]
    keys, states = _cursors(urls, kw, 3, ks)
    assert len(keys) == 5000
    got = _run_child(urls, kw, states, 20)
    for k, g in zip(ks, got, strict=True):
        assert g["keys"] == keys[k : k + 20], f"resume after {k} samples"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("workers", "buffer"), [(2, 6), (3, 1), (0, 40)],
                         ids=["2lanes-buf6", "3lanes-nobuf", "inline-buf40"])
def test_resume_at_every_position_with_bad_data(shard_factory, workers: int, buffer: int) -> None:
    """The fast-forward simulation against the real stream at every cut point, on data with
    corrupt samples, a truncated shard and hence top-ups (which are resumed into too)."""
    ss = shard_factory([9, 4, 11, 6], corrupt={(0, 3): "bad_header", (2, 0): "empty",
                                               (2, 7): "bad_label"}, truncate={3: 0.5})
    root = str(ss.root)
    kw = {"rank": 1, "world_size": 2, "num_workers": workers, "seed": 2, "shuffle_buffer": buffer,
          "exact_epoch": True, "max_bad_fraction": 0.5}
    ref = ShardStream(root, **kw)
    ref.set_epoch(1)
    full = []
    states = []
    for x in ref:
        full.append(x.key)
        states.append(ref.state_dict())
    assert len(full) == 15 and ref.counters["topped_up"] > 0
    for k in range(1, len(full)):
        s = ShardStream(root, **kw)
        s.load_state_dict(json.loads(json.dumps(states[k - 1])))  # as stored in a checkpoint
        s.set_epoch(1)
        assert [x.key for x in s] == full[k:], f"resume after {k} samples"
        assert s.counters["replayed"] == 0


def test_resume_reads_far_less_than_the_epoch(cifar10_dir: Path) -> None:
    urls = f"{cifar10_dir}#train"
    kw = {"num_workers": 2, "seed": 1, "shuffle_buffer": 100}
    s = ShardStream(urls, **kw)
    st = s.state_dict(position=45_000)
    st["log"] = {"bad": [], "short": []}
    t = ShardStream(urls, **kw)
    t.load_state_dict(st)
    it = iter(t)
    next(it)
    it.close()
    c = t.counters
    assert c["fast_forwarded"] == 45_000 and c["replayed"] == 0
    assert c["refetched"] <= 100 and c["read"] < 10_000  # a shard or two, not 45,000 samples
