"""Reading WebDataset tar shards as a stream of (key, {ext: bytes}) groups.

Why not webdataset's tar iterator: we need to know *how* a shard ended (cleanly, or cut
short / corrupt after n samples) to keep what was read, count the loss and still fail
loudly on storage errors; webdataset folds all of that into one handler callback.
Grouping follows webdataset's convention: a sample is a run of consecutive members
sharing the path up to the first dot of the file name.

A shard is input from anywhere, so every number its headers hold is bounded before it is
used (docs/data.md, "Limits"): a member's size (octal or GNU base-256, or a pax `size`
record) by `max_member_bytes` (data.max_member_bytes), and so is a sample's total; a GNU
long name or pax header by MAX_META_BYTES, a name by MAX_NAME_BYTES, a pax header's
records by MAX_PAX_RECORDS (each record's length checked against the header), a sample's
members by MAX_SAMPLE_MEMBERS. Data is read in chunks, so memory follows the bytes that
are there, not the size a header claims (a 1 MB .tar.gz claiming a 1 GiB member is
refused before any of it is inflated). A violation ends the shard like a truncation
(`ShardEnded`, counted by the caller); it is never a loop, a traceback or an allocation
of the claimed size. A `stop` callable, checked before each header and each 1 MiB of
data, ends a read from another thread (`Stopped`).
"""

from __future__ import annotations

import gzip
import re
import tarfile
import zlib
from collections.abc import Callable, Iterator
from typing import IO

from sslstream.pipelines.shards.storage import StorageError

__all__ = ["DEFAULT_MAX_MEMBER_BYTES", "IMAGE_EXTS", "MAX_META_BYTES", "MAX_NAME_BYTES",
           "MAX_PAX_RECORDS", "MAX_SAMPLE_MEMBERS", "ShardEnded", "Stopped",
           "iter_tar_samples", "split_key"]

DEFAULT_MAX_MEMBER_BYTES = 256 << 20  # data.max_member_bytes
MAX_META_BYTES = 1 << 20  # a pax extended header or GNU long name: metadata, not content
MAX_NAME_BYTES = 4096  # a member's path (Linux PATH_MAX)
MAX_PAX_RECORDS = 1024
MAX_SAMPLE_MEMBERS = 64  # members of one key (an image, a label, a few metadata files)

_KEY_RE = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
BLOCK = 512
_ZERO_BLOCK = bytes(BLOCK)
_CHUNK = 1 << 20
_META_KINDS = {b"L": "GNU long name", b"K": "GNU long link name", b"x": "pax header",
               b"g": "pax global header"}


class Stopped(Exception):
    """The read was stopped by the caller's `stop()` (its process is being interrupted)."""


class ShardEnded(Exception):
    """The shard's data ended early or became unreadable after `samples` complete samples."""

    def __init__(self, reason: str, samples: int) -> None:
        super().__init__(reason)
        self.reason = reason
        self.samples = samples


def split_key(name: str) -> tuple[str, str] | None:
    """('dir/key', 'ext') for a member name, None for names without an extension."""
    m = _KEY_RE.match(name)
    return (m.group(1), m.group(2).lower()) if m else None


def _number(field: bytes, what: str) -> int:
    """A numeric header field: NUL/space-terminated octal, or GNU base-256 (first byte
    0x80); a negative base-256 value (first byte 0xff) or anything else is an error."""
    if field[:1] == b"\x80":  # GNU base-256 for large values
        return int.from_bytes(field[1:], "big")
    if field[:1] == b"\xff":
        raise tarfile.ReadError(f"negative {what} field (GNU base-256 {field.hex()})")
    digits = field.split(b"\x00", 1)[0].strip(b" ")
    if not digits:
        return 0
    if digits.isdigit():  # ASCII digits only: int() would also take "+", "-", "_", "0o"
        try:
            return int(digits, 8)
        except ValueError:  # an 8 or a 9
            pass
    raise tarfile.ReadError(f"bad {what} field {field[:12]!r}")


def _pax_records(data: bytes) -> dict[str, bytes]:
    """The records of a pax extended header ("<len> <key>=<value>\\n", where <len> counts
    the whole record): every length is checked against the data before it is used."""
    out: dict[str, bytes] = {}
    i = 0
    while i < len(data) and data[i] != 0:  # NUL padding after the last record
        if len(out) >= MAX_PAX_RECORDS:
            raise tarfile.ReadError(f"pax header with more than {MAX_PAX_RECORDS} records")
        sp = data.find(b" ", i, i + 12)
        digits = data[i:sp] if sp > i else b""
        if not digits.isdigit():
            raise tarfile.ReadError(f"pax record at byte {i}: length {data[i:i + 12]!r} is not "
                                    "a decimal number")
        n = int(digits)
        end = i + n
        if n < len(digits) + 4 or end > len(data) or data[end - 1] != 0x0A:
            raise tarfile.ReadError(f"pax record at byte {i} claims {n} bytes: not a record "
                                    f"of the {len(data)}-byte header")
        key, eq, value = data[sp + 1 : end - 1].partition(b"=")
        if not eq:
            raise tarfile.ReadError(f"pax record at byte {i} has no '='")
        out[key.decode("utf-8", "surrogateescape")] = value
        i = end
    return out


def _pax_size(value: bytes | None) -> int | None:
    if value is None:
        return None
    if not value.isdigit():
        raise tarfile.ReadError(f"pax size record {value[:24]!r} is not a decimal number")
    return int(value)


def _name(raw: bytes) -> str:
    if len(raw) > MAX_NAME_BYTES:
        raise tarfile.ReadError(f"a member name of {len(raw)} bytes (more than {MAX_NAME_BYTES})")
    return raw.decode("utf-8", "surrogateescape")


def _check_stop(stop: Callable[[], bool] | None) -> None:
    if stop is not None and stop():
        raise Stopped("reading stopped (the process is being interrupted)")


def _read_data(f: IO[bytes], size: int, name: str, stop: Callable[[], bool] | None,
               keep: bool = True) -> bytes:
    """`size` bytes of member data and its padding to the next block, read in chunks of at
    most 1 MiB: memory follows the data that is there, never the size a header claims, and
    `stop` is checked between chunks. `keep=False` discards the data (returns b"")."""
    parts: list[bytes] = []
    left = size + (-size % BLOCK)
    want = size
    while left:
        if left > _CHUNK:
            _check_stop(stop)
        b = f.read(min(left, _CHUNK))
        if not b:
            raise tarfile.ReadError(f"unexpected end of data in member {name[:200]!r} "
                                    f"(its header claims {size} bytes)")
        left -= len(b)
        if keep and want:
            parts.append(b[:want] if len(b) > want else b)
            want -= len(parts[-1])
    if len(parts) < 2:
        return parts[0] if parts else b""
    return b"".join(parts)


def _members(f: IO[bytes], max_member_bytes: int,
             stop: Callable[[], bool] | None) -> Iterator[tuple[str, bytes]]:
    """(name, data) of the regular files of a (possibly gzipped) tar stream.

    A minimal ustar/pax/GNU reader: tarfile's generic header parsing costs ~3x more per
    member, which for small images (CIFAR: 2 members of ~1 KB per sample) was the stream's
    main cost. Checksums are verified and every number a header holds is bounded before
    it is used (module docstring); anything malformed raises tarfile.ReadError.
    """
    head = f.peek(2)[:2] if hasattr(f, "peek") else b""
    if head == b"\x1f\x8b":
        f = gzip.GzipFile(fileobj=f, mode="rb")  # noqa: SIM115 (closed with the caller's file)
    long_name: str | None = None
    pax_size: int | None = None
    while True:
        if stop is not None and stop():
            raise Stopped("reading stopped (the process is being interrupted)")
        hdr = f.read(BLOCK)
        if len(hdr) == 0:
            return  # no end-of-archive blocks: treat a clean cut at a header as the end
        if len(hdr) < BLOCK:
            raise tarfile.ReadError("unexpected end of data in a header")
        if hdr == _ZERO_BLOCK:
            return
        chk = _number(hdr[148:156], "checksum")
        if chk != sum(hdr[:148]) + 256 + sum(hdr[156:]):
            raise tarfile.ReadError("header checksum mismatch")
        kind = hdr[156:157]
        size = _number(hdr[124:136], "size")
        if kind in _META_KINDS:  # data about the next member (L, x) or none we use (K, g)
            if size > MAX_META_BYTES:
                raise tarfile.ReadError(f"a {_META_KINDS[kind]} of {size} bytes (more than "
                                        f"{MAX_META_BYTES})")
            data = _read_data(f, size, _META_KINDS[kind], stop)
            if kind == b"L":
                long_name = _name(data.split(b"\x00", 1)[0])
            elif kind == b"x":
                rec = _pax_records(data)
                if "path" in rec:
                    long_name = _name(rec["path"])
                pax_size = _pax_size(rec.get("size"))
            continue
        if pax_size is not None:
            size, pax_size = pax_size, None
        if long_name is not None:
            name, long_name = long_name, None
        else:  # at most 100 + 155 bytes: no length check needed
            name = hdr[:100].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            if hdr[257:262] == b"ustar" and hdr[345] != 0:
                prefix = hdr[345:500].split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
                name = f"{prefix}/{name}"
        if size > max_member_bytes:
            raise tarfile.ReadError(
                f"member {name[:200]!r} claims {size} bytes, more than max_member_bytes="
                f"{max_member_bytes} (data.max_member_bytes; shards verify/index "
                "--max-member-bytes)")
        if kind not in (b"0", b"\x00", b"7"):  # dirs, links, sparse files...: skipped
            _read_data(f, size, name, stop, keep=False)
            continue
        padded = size + (-size % BLOCK)
        if padded <= _CHUNK:  # the common case, inline: one read (a small image's cost)
            block = f.read(padded)
            if len(block) < padded:
                raise tarfile.ReadError(f"unexpected end of data in member {name[:200]!r} "
                                        f"(its header claims {size} bytes)")
            yield name, block[:size] if padded != size else block
        else:
            yield name, _read_data(f, size, name, stop)


def iter_tar_samples(f: IO[bytes], *, max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                     stop: Callable[[], bool] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, parts) per sample; raise ShardEnded if the stream breaks or a header
    passes a limit (module docstring), Stopped when `stop()` turns true.

    The sample being assembled when the data breaks is dropped (it may lack parts).
    StorageError (permanent storage failure) propagates unchanged.
    """
    key: str | None = None
    parts: dict[str, bytes] = {}
    held = 0
    n = 0
    try:
        for name, data in _members(f, max_member_bytes, stop):
            kx = split_key(name)
            if kx is None:
                continue
            if kx[0] != key:
                if key is not None:
                    n += 1
                    yield key, parts
                key, parts, held = kx[0], {}, 0
            parts[kx[1]] = data
            held += len(data)
            if len(parts) > MAX_SAMPLE_MEMBERS or held > max_member_bytes:
                raise tarfile.ReadError(
                    f"sample {key[:200]!r} holds more than "
                    + (f"{MAX_SAMPLE_MEMBERS} members" if len(parts) > MAX_SAMPLE_MEMBERS
                       else f"max_member_bytes={max_member_bytes} bytes in its members"))
    except StorageError:
        raise
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        raise ShardEnded(f"{type(e).__name__}: {e}", n) from None
    if key is not None:
        yield key, parts
