"""Fuzzing the tar reader (pipelines/shards/tario.py) with mutated headers: bounded, seeded.

A few hundred archives derived from valid ustar, GNU and pax tars (and their gzip forms) by
one mutation each -- sizes (octal, base-256, negative, past the data), pax records (length
digits, missing '=', truncation, a `size` record), GNU long names (lengths, no NUL),
checksums, type flags, member counts, truncation, gzip header and stream bytes -- go
through `iter_tar_samples` in one child process. Each must end, within CASE_LIMIT_S, with
samples or a ShardEnded naming the cause (the counted bad shard of the stream and `shards
verify`); any other exception, a hang or a peak RSS past RSS_LIMIT_MB fails the test and
names the case (rerun: `python -m tests.pipelines.test_tar_fuzz <index>`).
"""

from __future__ import annotations

import gzip
import io
import random
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.pipelines import tarcraft as tc

SEED = 27
CASES = 360
CASE_LIMIT_S = 10.0  # liveness: a case takes milliseconds; a loop would take forever
RSS_LIMIT_MB = 300  # the child's peak; the archives claim up to 2**88 bytes
ROOT = Path(__file__).resolve().parents[2]


def _tar(fmt: int, names: list[str]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tf:
        for i, n in enumerate(names):
            data = bytes([65 + i % 26]) * (100 + 700 * (i % 3))
            ti = tarfile.TarInfo(n)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    return out.getvalue()


def seeds() -> dict[str, bytes]:
    long_dir = "d" * 120
    names = ["a/k1.jpg", "a/k1.cls", "k2.jpg", "k2.cls", f"{long_dir}/k3.jpg", f"{long_dir}/k3.cls"]
    rec = tc.pax_record("path", "p/k.jpg") + tc.pax_record("size", "600")
    return {
        "ustar": _tar(tarfile.USTAR_FORMAT, names[:4]),
        "gnu": _tar(tarfile.GNU_FORMAT, names),  # GNU long names (type L)
        "pax": _tar(tarfile.PAX_FORMAT, [*names, "ünï/k4.jpg"]),  # pax path records
        "pax-size": (tc.header("PaxHeaders/k", len(rec), b"x") + tc.pad(rec)
                     + tc.header("k.jpg", 0) + tc.pad(bytes(600)) + tc.end()),
    }


def _headers(data: bytes) -> list[int]:
    """Offsets of the headers of a plain tar (walking sizes as a reader would)."""
    out, pos = [], 0
    while pos + 512 <= len(data) and data[pos:pos + 512] != bytes(512):
        out.append(pos)
        size = int(data[pos + 124:pos + 136].split(b"\0")[0].strip() or b"0", 8)
        pos += 512 + size + (-size % 512)
    return out


def _set(data: bytes, off: int, field: slice, value: bytes, fix: bool) -> bytes:
    h = bytearray(data[off:off + 512])
    h[field] = value.ljust(field.stop - field.start, b"\0")[: field.stop - field.start]
    h = bytearray(tc.with_checksum(h)) if fix else h
    return data[:off] + bytes(h) + data[off + 512:]


SIZE = slice(124, 136)
NAME = slice(0, 100)
KIND = slice(156, 157)


def _size_value(rng: random.Random) -> bytes:
    return rng.choice([
        lambda: tc.octal(rng.randrange(1 << 33), 12),
        lambda: tc.octal(rng.randrange(1, 4096), 12),
        lambda: tc.base256(rng.randrange(1 << 88)),
        lambda: tc.base256(rng.randrange(1, 1 << 20)),
        lambda: tc.base256(-rng.randrange(1, 1 << 40)),
        lambda: b"-" + tc.octal(rng.randrange(1 << 20), 11),
        lambda: bytes(rng.randrange(256) for _ in range(12)),
        lambda: b"0o17\0",
        lambda: b"1_000\0",
        lambda: b" 777 \0",
    ])()


def _pax_mutation(rng: random.Random, data: bytes) -> bytes:
    """A pax header whose records are damaged, put in front of the archive's data."""
    good = tc.pax_record("path", "x/y.jpg") + tc.pax_record("mtime", "1.5")
    body = rng.choice([
        lambda: f"{rng.choice([-20, 0, 1, 3, 10**6, 2**64])} path=x\n".encode(),
        lambda: good[: rng.randrange(1, len(good))],
        lambda: b"20 pathx/y.jpg\n" + b"." * 5,
        lambda: b"abc path=x\n",
        lambda: good + b"\0" * rng.randrange(1, 100),
        lambda: tc.pax_record("size", rng.choice(["-5", "99999999999999999999", "1e9", "",
                                                   str(rng.randrange(1 << 30))])),
        lambda: tc.pax_record("path", "p" * rng.choice([10, 5000, 70000])),
        lambda: b"".join(tc.pax_record(f"k{i}", "v") for i in range(rng.choice([10, 2000]))),
    ])()
    declared = rng.choice([len(body), len(body) + rng.randrange(1, 600), max(0, len(body) - 3)])
    return tc.header("PaxHeaders/y", declared, b"x") + tc.pad(body) + data


def _gnu_name_mutation(rng: random.Random, data: bytes) -> bytes:
    n = rng.choice([0, 1, 100, 4096, 4097, 300_000])
    name = (b"n" * n)[: max(0, n - 4)] + b".jpg" + rng.choice([b"\0", b""])
    declared = rng.choice([len(name), len(name) + 1000, 1 << 40])
    return tc.header("././@LongLink", declared, b"L") + tc.pad(name) + data


def mutate(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """One mutation of a plain tar: (description, archive)."""
    offs = _headers(data)
    off = rng.choice(offs)
    kind = rng.randrange(10)
    if kind == 0:
        return "size", _set(data, off, SIZE, _size_value(rng), fix=True)
    if kind == 1:
        return "size, bad checksum", _set(data, off, SIZE, _size_value(rng), fix=False)
    if kind == 2:
        return "pax records", _pax_mutation(rng, data)
    if kind == 3:
        return "gnu long name", _gnu_name_mutation(rng, data)
    if kind == 4:
        return "type flag", _set(data, off, KIND, bytes([rng.randrange(256)]), fix=True)
    if kind == 5:
        return "checksum", _set(data, off, slice(148, 156), bytes(rng.randrange(256)
                                                                  for _ in range(8)), fix=False)
    if kind == 6:
        return "name", _set(data, off, NAME, bytes(rng.randrange(256) for _ in range(100)),
                            fix=True)
    if kind == 7:
        n = rng.choice([70, 200, 2000])
        return f"{n} members of one key", b"".join(
            tc.member(f"k.e{i}", b"x" * rng.randrange(600)) for i in range(n)) + tc.end()
    if kind == 8:
        return "truncated", data[: rng.randrange(len(data))]
    i = rng.randrange(len(data))
    return "byte flips", bytes(b ^ rng.randrange(1, 256) if i <= j < i + 8 else b
                               for j, b in enumerate(data))


def gzip_mutate(rng: random.Random, tar: bytes) -> tuple[str, bytes]:
    """A mutated tar gzip'd, or a valid tar's gzip with damaged gzip bytes."""
    if rng.random() < 0.5:
        what, data = mutate(rng, tar)
        return f"gzip of ({what})", gzip.compress(data, mtime=0)
    gz = bytearray(gzip.compress(tar, mtime=0))
    kind = rng.randrange(4)
    if kind == 0:  # header flags (FEXTRA / FNAME / FCOMMENT without their fields)
        gz[3] = rng.randrange(256)
        return "gzip flags", bytes(gz)
    if kind == 1:
        return "gzip truncated", bytes(gz[: rng.randrange(2, len(gz))])
    if kind == 2:
        i = rng.randrange(10, len(gz))
        gz[i] ^= rng.randrange(1, 256)
        return "gzip stream byte", bytes(gz)
    gz[-8:] = bytes(rng.randrange(256) for _ in range(8))  # CRC / ISIZE
    return "gzip trailer", bytes(gz)


def cases() -> Iterator[tuple[int, str, bytes]]:
    rng = random.Random(SEED)
    base = seeds()
    names = sorted(base)
    for i in range(CASES):
        seed_name = names[i % len(names)]
        if i % 4 == 3:
            what, data = gzip_mutate(rng, base[seed_name])
        else:
            what, data = mutate(rng, base[seed_name])
        yield i, f"{seed_name}: {what}", data


def _run(data: bytes) -> str:
    from sslstream.pipelines.shards.tario import ShardEnded, iter_tar_samples

    try:
        n = sum(1 for _ in iter_tar_samples(io.BufferedReader(io.BytesIO(data))))
    except ShardEnded as e:
        assert e.reason and ":" in e.reason, e.reason  # "<error type>: <what>"
        return f"ended after {e.samples}: {e.reason[:80]}"
    return f"{n} samples"


def child(only: int | None = None) -> None:
    """Every case in turn, one line before and after each (the parent's watchdog reads
    them); the last line is the peak RSS."""
    for i, what, data in cases():
        if only is not None and i != only:
            continue
        print(f"START {i} {what}", flush=True)
        print(f"END {i} {_run(data)}", flush=True)
    hwm = next(ln for ln in Path("/proc/self/status").read_text().splitlines()
               if ln.startswith("VmHWM"))
    print(f"VMHWM_KB {hwm.split()[1]}", flush=True)


def _lines(proc: subprocess.Popen, deadline_of: Callable[[], float]) -> Iterator[str]:
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        left = deadline_of() - time.monotonic()
        if left <= 0 or not sel.select(left):
            yield "TIMEOUT"
            return
        line = proc.stdout.readline()
        if not line:
            return
        yield line.rstrip("\n")


@pytest.mark.timeout(120)
def test_mutated_headers_end_with_samples_or_a_named_error_in_bounded_time_and_memory():
    proc = subprocess.Popen([sys.executable, "-c", "from tests.pipelines.test_tar_fuzz import "
                             "child; child()"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    current = ["(start-up)"]
    deadline = [time.monotonic() + 60.0]  # the import, then CASE_LIMIT_S per case
    done = ended = 0
    try:
        for line in _lines(proc, lambda: deadline[0]):
            if line == "TIMEOUT":
                pytest.fail(f"case {current[0]} did not end within {CASE_LIMIT_S} s")
            if line.startswith("START "):
                current[0] = line[6:]
                deadline[0] = time.monotonic() + CASE_LIMIT_S
            elif line.startswith("END "):
                done += 1
                ended += line.split(" ", 2)[2].startswith("ended")
            elif line.startswith("VMHWM_KB "):
                rss_mb = int(line.split()[1]) / 1024
                assert rss_mb < RSS_LIMIT_MB, f"peak RSS {rss_mb:.0f} MB"
            else:  # an exception other than ShardEnded: its traceback
                pytest.fail(f"case {current[0]}: {line}\n{proc.stdout.read()[-3000:]}")
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert done == CASES, f"{done} of {CASES} cases ran"
    assert CASES // 2 < ended < CASES, ended  # most mutations reach a check, not all break it


if __name__ == "__main__":  # one case, in this process: python -m tests.pipelines.test_tar_fuzz 17
    child(int(sys.argv[1]) if len(sys.argv) > 1 else None)
