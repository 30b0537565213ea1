"""The local shard cache: object-store shards kept on a node's disk, shared by its ranks.

Why: a rank's shards change every epoch (pipelines/shards/plan.py), so without a cache every
epoch reads the whole set from S3/GCS again, and each byte is paid for. With
`data.cache_dir` a shard read from an object store is downloaded once into the folder,
checked, and read from local disk from then on, until it is evicted (least recently used
first) to keep the folder under `data.cache_limit` bytes. Local shards are never copied.

What it guarantees:
- one download per shard on a node, even when several processes (ranks, reader processes,
  lanes) want it at the same time: a per-shard file lock (`flock`) is held for the download,
  which lands in a temporary file and is published by an atomic rename; a process that
  finds the lock taken waits and then reads the published file;
- a cache file is checked before every use against the manifest's size and sha256 (and
  against the checksum taken when it was downloaded): a corrupted or truncated file is
  dropped, fetched again and counted (`cache_corrupt`, with a warning naming the shard);
  a file that no longer matches the manifest (the shard was rewritten) is refreshed. A shard
  whose manifest gives no sha256 is also compared with the store's ETag (one HEAD);
- a folder that cannot be written, or a disk that fills up, turns the cache off for the
  process with one warning: shards are then streamed from the store as without a cache
  (nothing lost, the run goes on; `cache_streamed` counts them);
- the order of samples never depends on the cache: it only changes where bytes come from,
  so cursors, resume and every guarantee of the stream hold with or without it.

Layout under the folder (safe to delete while no run uses it):

    objects/<key>          a shard's bytes (key: sha256 of the shard URL, 32 hex digits)
    objects/<key>.json     its record: url, bytes, sha256 (taken at download), store version
    locks/<key>.lock       held while one process downloads that shard
    tmp/<key>.<n>.part     a download in progress (n: its size, counted against the limit)
    cache.lock             held while the size is accounted and entries are evicted

Least recently used is the file's mtime, set on every use.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import fsspec
from sslstream.pipelines.shards.storage import StorageError, get_fs, open_reader, with_retries

log = logging.getLogger(__name__)

__all__ = ["Expected", "ShardCache", "cache_options", "is_remote", "open_shard",
           "too_big_for"]

Count = Callable[[str, int], None]
_CHUNK = 1 << 20
_LOCAL_PROTOCOLS = ("file", "local")

# Directories this process found unusable (-> reason): every ShardCache on them streams,
# and the warning is given once per process.
_unusable: dict[str, str] = {}
_unusable_lock = threading.Lock()


def _no_count(name: str, n: int = 1) -> None:
    pass


@dataclass(frozen=True)
class Expected:
    """What a shard must be, from its manifest entry (None: the manifest does not say)."""

    bytes: int | None = None
    sha256: str | None = None


class _Unusable(Exception):
    """The cache folder cannot be used (not writable, disk full): stream instead."""


def is_remote(url: str) -> bool:
    """A shard the cache takes: any fsspec protocol but the local file system."""
    protocol = fsspec.utils.get_protocol(url)
    return protocol not in _LOCAL_PROTOCOLS


def cache_options(data: Any) -> dict:
    """ShardStream keyword arguments from the ``data`` config section (cache_dir,
    cache_limit: every key set, orchestration/schema/data.py)."""
    return {"cache_dir": data.cache_dir, "cache_limit": data.cache_limit}


def too_big_for(limit: int | None, sizes: Iterable[tuple[str, int | None]]) -> tuple[str, int] | None:
    """The largest object-store shard of known size ((url, bytes) pairs) when it is larger
    than `limit`, else None. The cache never holds a shard larger than its limit: such a
    shard is read from the store every time."""
    known = [(n, u) for u, n in sizes if n is not None and is_remote(u)]
    if limit is None or not known:
        return None
    biggest, url = max(known)
    return (url, biggest) if biggest > limit else None


class ShardCache:
    """The cache in `directory`, at most `limit` bytes of shards (None: no limit but the
    disk). `expected` maps shard URLs to their manifest size / sha256. Picklable: reader
    and lane processes get copies that share the folder."""

    def __init__(self, directory: str | os.PathLike, limit: int | None = None, *,
                 storage_options: dict | None = None,
                 expected: Mapping[str, Expected] | None = None) -> None:
        if limit is not None and int(limit) < 1:
            raise ValueError(f"cache_limit={limit}: expected a positive number of bytes")
        self.dir = Path(directory).expanduser().absolute()
        self.limit = int(limit) if limit is not None else None
        self.storage_options = storage_options
        self.expected = dict(expected or {})
        # why the folder cannot be used, once found: copies made after that (the stream
        # pickled to its reader processes) stream without trying again, or warning again
        self.off: str | None = None
        try:
            self._prepare()
        except OSError as e:
            self._turn_off(_why(e))

    # ------------------------------------------------------------------ state

    @property
    def usable(self) -> bool:
        if self.off is not None:
            return False
        with _unusable_lock:
            return str(self.dir) not in _unusable

    def _turn_off(self, reason: str) -> None:
        """Stream from now on in this process (and in copies made from this object), with
        one warning per process and folder."""
        self.off = reason
        with _unusable_lock:
            first = str(self.dir) not in _unusable
            _unusable.setdefault(str(self.dir), reason)
        if first:
            log.warning("data.cache_dir=%s cannot be used (%s): shards are read from the store "
                        "without the cache from now on in this process; nothing is lost. Fix: "
                        "a writable folder with room for data.cache_limit, or "
                        "data.cache_dir=null", self.dir, reason)

    def _prepare(self) -> None:
        for sub in ("objects", "locks", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        probe = self.dir / "tmp" / f".probe-{os.getpid()}-{threading.get_ident()}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()

    def key(self, url: str) -> str:
        return hashlib.sha256(url.encode()).hexdigest()[:32]

    def _data(self, key: str) -> Path:
        return self.dir / "objects" / key

    def _meta(self, key: str) -> Path:
        return self.dir / "objects" / f"{key}.json"

    # ------------------------------------------------------------------ reading

    def open(self, url: str, *, count: Count = _no_count,
             on_retry: Callable[[BaseException], None] | None = None) -> IO[bytes]:
        """A binary file positioned at the start of shard `url`: the cached copy (fetched
        first if needed), or a stream from the store when the shard is local, the cache
        unusable, or the shard cannot be cached."""
        if not is_remote(url):
            return open_reader(url, self.storage_options, on_retry=on_retry)
        if self.usable:
            try:
                return self._open_cached(url, count, on_retry)
            except _Unusable as e:
                self._turn_off(str(e))
        count("cache_streamed", 1)
        return open_reader(url, self.storage_options, on_retry=on_retry)

    def _open_cached(self, url: str, count: Count,
                     on_retry: Callable[[BaseException], None] | None) -> IO[bytes]:
        key = self.key(url)
        f, _ = self._lookup(key, url)  # no lock: the usual case, a valid file
        if f is not None:
            count("cache_hits", 1)
            return f
        with self._key_lock(key, count):
            f, state = self._lookup(key, url)  # another process may have fetched it meanwhile
            if f is not None:
                count("cache_hits", 1)
                return f
            if state == "corrupt":
                count("cache_corrupt", 1)
                log.warning("cache file of %s is corrupt or truncated (%s): dropped, fetching "
                            "the shard again", url, self._data(key))
            if state != "missing":
                try:
                    self._drop(key)
                except OSError as e:
                    raise _Unusable(_why(e)) from None
            return self._fetch(key, url, count, on_retry)

    def _lookup(self, key: str, url: str) -> tuple[IO[bytes] | None, str]:
        """(the open cache file, "ok") if it holds `url` as expected, else (None, why):
        "missing", "corrupt" (damaged since it was written) or "stale" (the shard changed)."""
        path = self._data(key)
        try:
            f = open(path, "rb")  # noqa: SIM115 - returned to the caller, who closes it
        except FileNotFoundError:
            return None, "missing"
        except OSError as e:
            raise _Unusable(_why(e)) from None
        try:
            state = self._check(f, key, url)
        except StorageError:  # asking the store for a version: not the folder's fault
            f.close()
            raise
        except OSError as e:
            f.close()
            raise _Unusable(_why(e)) from None
        except BaseException:
            f.close()
            raise
        if state != "ok":
            f.close()
            return None, state
        f.seek(0)
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        return f, "ok"

    def _check(self, f: IO[bytes], key: str, url: str) -> str:
        try:
            meta = json.loads(self._meta(key).read_text())
            recorded = (str(meta["url"]), int(meta["bytes"]), str(meta["sha256"]))
        except FileNotFoundError:
            return "corrupt"  # written before its record: not by this module, or damaged
        except (ValueError, KeyError, TypeError):
            return "corrupt"
        if recorded[0] != url:
            return "corrupt"
        exp = self.expected.get(url, Expected())
        if (exp.bytes is not None and exp.bytes != recorded[1]) or \
                (exp.sha256 is not None and exp.sha256 != recorded[2]):
            return "stale"  # the manifest now describes other bytes
        if os.fstat(f.fileno()).st_size != recorded[1] or _sha256(f) != recorded[2]:
            return "corrupt"
        if exp.sha256 is None and meta.get("version") != self._store_version(url):
            return "stale"  # no manifest checksum: the store's own says whether it changed
        return "ok"

    def _store_version(self, url: str) -> str | None:
        from sslstream.pipelines.shards.snapshot import fingerprint_from_info

        fs, path = get_fs(url, self.storage_options)

        def info() -> dict:
            fs.invalidate_cache(path)  # a listing cached by this process may be old
            return fs.info(path)

        return fingerprint_from_info(with_retries(info, url, what="checking"))

    # ------------------------------------------------------------------ fetching

    def _fetch(self, key: str, url: str, count: Count,
               on_retry: Callable[[BaseException], None] | None) -> IO[bytes]:
        """Download `url` into the cache (the key lock is held) and open it; when it does
        not fit or does not match its manifest, the bytes are read without being kept."""
        exp = self.expected.get(url, Expected())
        # without a manifest checksum the store's version is the record's; asked before the
        # download, so a change during it shows as a new version at the next use
        version = None if exp.sha256 is not None else self._store_version(url)
        src = open_reader(url, self.storage_options, on_retry=on_retry)
        size = src.raw.size  # type: ignore[attr-defined]
        if exp.bytes is not None and exp.bytes != size:
            log.warning("%s is %d bytes, its manifest says %d: read without caching (sslstream "
                        "shards verify names what changed)", url, size, exp.bytes)
            count("cache_streamed", 1)
            return src
        try:
            fits = self._reserve(key, size, url, count)
        except BaseException:
            src.close()
            raise
        if not fits:
            count("cache_streamed", 1)
            return src
        part = self.dir / "tmp" / f"{key}.{size}.part"
        try:
            digest = self._download(src, part, count)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
        finally:
            src.close()
        try:
            f = open(part, "rb")  # noqa: SIM115 - the caller closes it
        except OSError as e:
            with contextlib.suppress(OSError):
                part.unlink()
            raise _Unusable(_why(e)) from None
        if exp.sha256 is not None and digest != exp.sha256:
            log.warning("%s does not match the sha256 of its manifest: read without caching "
                        "(sslstream shards verify names what changed)", url)
            part.unlink()  # the open file stays readable
            count("cache_streamed", 1)
            return f
        try:
            meta = {"url": url, "bytes": size, "sha256": digest, "version": version}
            tmp_meta = part.with_suffix(".json")
            tmp_meta.write_text(json.dumps(meta))
            os.replace(tmp_meta, self._meta(key))  # the record first: a file is never without it
            os.replace(part, self._data(key))
        except OSError as e:
            f.close()
            for p in (part, part.with_suffix(".json"), self._data(key), self._meta(key)):
                with contextlib.suppress(OSError):
                    p.unlink()
            raise _Unusable(_why(e)) from None
        count("cache_fetched", 1)
        count("cache_fetched_bytes", size)
        return f

    def _download(self, src: IO[bytes], part: Path, count: Count) -> str:
        """Copy `src` into `part`, returning its sha256; local write errors -> _Unusable
        (storage errors of `src` propagate as they are)."""
        h = hashlib.sha256()
        try:
            out = open(part, "wb")  # noqa: SIM115 - closed below
        except OSError as e:
            raise _Unusable(_why(e)) from None
        try:
            while chunk := src.read(_CHUNK):  # a storage error propagates as it is
                h.update(chunk)
                try:
                    out.write(chunk)
                except OSError as e:
                    raise _Unusable(_why(e)) from None
        finally:
            try:
                out.close()  # flushes: a full disk may show only here
            except OSError as e:
                raise _Unusable(_why(e)) from None
        return h.hexdigest()

    def _drop(self, key: str) -> None:
        for p in (self._data(key), self._meta(key)):  # the bytes first, then their record
            with contextlib.suppress(FileNotFoundError):
                p.unlink()

    # ------------------------------------------------------------------ room

    def _reserve(self, key: str, size: int, url: str, count: Count) -> bool:
        """Make room for `size` bytes by evicting the least recently used entries; False
        when the shard cannot fit under the limit (it is then streamed)."""
        if self.limit is not None and size > self.limit:
            log.debug("%s (%d bytes) is larger than data.cache_limit=%d: read without "
                      "caching", url, size, self.limit)
            return False
        try:
            with self._global_lock():
                for stale in (self.dir / "tmp").glob(f"{key}.*"):
                    stale.unlink()  # left by a killed download of this shard (we hold its lock)
                entries, used = self._usage(exclude=key)
                if self.limit is None:
                    return True
                for _, n, k in sorted(entries):  # least recently used first
                    if used + size <= self.limit:
                        break
                    self._drop(k)
                    used -= n
                    count("cache_evicted", 1)
                return used + size <= self.limit
        except OSError as e:
            raise _Unusable(_why(e)) from None

    def _usage(self, exclude: str) -> tuple[list[tuple[int, int, str]], int]:
        """Entries as (mtime_ns, bytes, key), and the bytes in use: entries plus the
        downloads in progress; downloads left by killed processes are removed."""
        entries = []
        used = 0
        for p in (self.dir / "objects").iterdir():
            if p.suffix == ".json" or p.name == exclude:
                continue
            with contextlib.suppress(FileNotFoundError):
                st = p.stat()
                entries.append((st.st_mtime_ns, st.st_size, p.name))
                used += st.st_size
        for p in (self.dir / "tmp").glob("*.part"):
            k, _, n = p.name[: -len(".part")].partition(".")
            if k == exclude:
                continue
            if self._downloading(k):
                used += int(n) if n.isdigit() else 0
            else:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        return entries, used

    def _downloading(self, key: str) -> bool:
        """Whether some process holds the lock of `key` (a download in progress)."""
        try:
            fd = os.open(self.dir / "locks" / f"{key}.lock", os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)  # closing releases a lock taken here
        return False

    # ------------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _key_lock(self, key: str, count: Count) -> Iterator[None]:
        """Exclusive on this shard across processes and threads (flock: per open file)."""
        try:
            fd = os.open(self.dir / "locks" / f"{key}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise _Unusable(_why(e)) from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                count("cache_waited", 1)  # another process or lane is downloading it
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def _global_lock(self) -> Iterator[None]:
        fd = os.open(self.dir / "cache.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


def open_shard(url: str, storage_options: dict | None, *, cache: ShardCache | None,
               count: Count | None = None,
               on_retry: Callable[[BaseException], None] | None = None) -> IO[bytes]:
    """Shard `url` for reading: through `cache` when there is one, else from its store.
    `count(name, n)` receives the cache's counters."""
    if cache is None:
        return open_reader(url, storage_options, on_retry=on_retry)
    return cache.open(url, count=count or _no_count, on_retry=on_retry)


def _sha256(f: IO[bytes]) -> str:
    f.seek(0)
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _why(e: OSError) -> str:
    name = errno.errorcode.get(e.errno or 0, type(e).__name__)
    return f"{name}: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
