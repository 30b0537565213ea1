"""Writing, verifying and indexing WebDataset shards: `sslstream shards make|verify|index`.

Why our own writer: the stream's per-rank balance and its resume need exact per-shard
sample counts, and `verify` needs checksums; both go into manifest.json as the shards are
written. Shards are byte-reproducible (fixed member metadata, gzip mtime 0), so the same
input gives the same sha256 -- handy for caching and for spotting silent corruption.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import posixpath
import random
import re
import sys
import tarfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.indexer import (
    IndexedShard,
    index_shards,
)
from sslstream.pipelines.shards.manifest import (
    MANIFEST_NAME,
    Manifest,
    ShardEntry,
    join_url,
)
from sslstream.pipelines.shards.masking import install_log_masking, mask, remember
from sslstream.pipelines.shards.storage import StorageError, get_fs
from sslstream.pipelines.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from sslstream.pipelines.shards.validate import CorruptImage, sniff_format, validate_image
from sslstream.pipelines.shards.verify import ShardCheck, VerifyReport, verify, verify_tree

log = logging.getLogger(__name__)

__all__ = ["ShardCheck", "VerifyReport", "main", "reencode_baseline_jpeg", "verify", "write_shards"]

_EXT = {"jpeg": "jpg", "png": "png", "webp": "webp"}
_SRC_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm"}


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what goes to the underlying file (the stored bytes)."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.sha.update(b)
        self.n += len(b)
        self.f.write(b)
        return len(b)


def reencode_baseline_jpeg(data: bytes, quality: int = 95) -> bytes:
    """Decode with PIL and re-encode as baseline (non-progressive) RGB JPEG.

    Why: the GPU's hardware JPEG decoder takes baseline only, and this also normalises
    odd inputs (PNG with alpha, CMYK, palette images) to what every decoder handles.
    """
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=quality, progressive=False, optimize=False)
    return out.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mtime, ti.mode, ti.uname, ti.gname = len(data), 0, 0o644, "", ""
    tf.addfile(ti, io.BytesIO(data))


class _ShardWriter:
    def __init__(self, url: str, fs: Any, path: str, compress: bool) -> None:
        self.url, self.count, self.tar_bytes, self.keys = url, 0, 0, set()
        self._f = fs.open(path, "wb")  # noqa: SIM115 (closed in close())
        self._hw = _HashingWriter(self._f)
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._hw, mtime=0) if compress else None
        self._tf = tarfile.open(fileobj=self._gz or self._hw, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed in close())

    def add(self, key: str, ext: str, image: bytes, label: int | None) -> None:
        if key in self.keys:
            raise DataError(f"duplicate key {key!r} in shard {self.url}")
        self.keys.add(key)
        _add(self._tf, f"{key}.{ext}", image)
        self.tar_bytes += 512 + -(-len(image) // 512) * 512
        if label is not None:
            _add(self._tf, f"{key}.cls", str(int(label)).encode())
            self.tar_bytes += 1024
        self.count += 1

    def close(self) -> ShardEntry:
        self._tf.close()
        if self._gz is not None:
            self._gz.close()
        self._f.close()
        return ShardEntry(posixpath.basename(self.url), self.count, self._hw.sha.hexdigest(), self._hw.n)


def _clean_key(key: str) -> str:
    """Keys may not contain dots (webdataset splits the member name at the first dot)."""
    k = re.sub(r"[^A-Za-z0-9_\-/]", "_", key.strip("/"))
    if not k:
        raise DataError(f"empty sample key from {key!r}")
    return k


def write_shards(
    samples: Iterable[tuple[str, bytes, int | None]],
    out_dir: str | Path,
    *,
    prefix: str = "shard",
    max_count: int = 10_000,
    max_bytes: int = 1 << 30,
    reencode_baseline: bool = False,
    compress: bool = False,
    classes: list[str] | None = None,
    quality: int = 95,
    storage_options: dict | None = None,
    on_shard: Callable[[ShardEntry], None] | None = None,
) -> Manifest:
    """Write `<prefix>-000000.tar[.gz]`... and manifest.json under `out_dir` (path or URL).

    A shard closes at `max_count` samples or before it would pass `max_bytes` (tar bytes,
    before gzip). Images that fail the header check (or re-encoding) are skipped and
    listed in the returned manifest's `extra["skipped"]` (not written to the file).
    `on_shard` is called with each shard's entry as soon as it is closed (progress).
    """
    if max_count < 1 or max_bytes < 1024:
        raise DataError(f"max_count={max_count}, max_bytes={max_bytes}: too small")
    out = str(out_dir)
    fs, root = get_fs(out, storage_options)
    fs.makedirs(root, exist_ok=True)
    suffix = ".tar.gz" if compress else ".tar"
    entries: list[ShardEntry] = []
    skipped: list[str] = []
    w: _ShardWriter | None = None
    try:
        for key, image, label in samples:
            try:
                if reencode_baseline:
                    image = reencode_baseline_jpeg(image, quality)
                validate_image(image, "header")
            except (CorruptImage, OSError, ValueError) as e:
                log.warning("skipping sample %s: %s", key, e)
                skipped.append(key)
                continue
            ext = _EXT[sniff_format(image) or "jpeg"]
            est = 512 + len(image) + (1024 if label is not None else 0)
            if w is not None and (w.count >= max_count or w.tar_bytes + est > max_bytes):
                entries.append(w.close())
                w = None
                if on_shard is not None:
                    on_shard(entries[-1])
            if w is None:
                name = f"{prefix}-{len(entries):06d}{suffix}"
                w = _ShardWriter(join_url(out, name), fs, posixpath.join(root, name), compress)
            w.add(_clean_key(key), ext, image, label)
        if w is not None:
            entries.append(w.close())
            w = None
            if on_shard is not None:
                on_shard(entries[-1])
    finally:
        if w is not None:
            w.close()
    man = Manifest(shards=entries, classes=list(classes) if classes is not None else None)
    tmp = posixpath.join(root, f".{MANIFEST_NAME}.tmp")
    with fs.open(tmp, "w") as f:
        json.dump(man.to_dict(), f, indent=1)
    fs.mv(tmp, posixpath.join(root, MANIFEST_NAME))
    man.extra["skipped"] = skipped
    return man


class _Progress:
    """Progress lines on stderr for the shard commands: count, rate, time left."""

    def __init__(self, total: int, unit: str) -> None:
        self.total, self.unit, self.t0 = total, unit, time.perf_counter()

    def line(self, done: int, what: str) -> None:
        dt = time.perf_counter() - self.t0
        rate = done / dt if dt > 0 else 0.0
        left = f", ~{(self.total - done) / rate:.0f}s left" if rate > 0 and done < self.total else ""
        # a rate over a fraction of a second (the first shard, a cached read) is noise
        speed = (f"{rate:,.1f} {self.unit}/s" if rate < 10 else f"{rate:,.0f} {self.unit}/s"
                 ) if dt >= 1.0 else f"{dt:.1f}s"
        print(f"  {what} -- {done}/{self.total} {self.unit} ({speed}{left if dt >= 1.0 else ''})",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- CLI


def _say(text: str, file: IO[str] | None = None) -> None:
    """One output line of the shard commands, credentials masked (a source URL may hold
    them: `s3://KEY:SECRET@bucket/...`)."""
    print(mask(text), file=file or sys.stdout)


def _storage_options(text: str | None) -> dict | None:
    """--storage-options: a JSON object (the error never repeats it: it may hold secrets)."""
    if not text:
        return None
    try:
        value = json.loads(text)
        remember({"storage_options": value})
    except json.JSONDecodeError as e:
        raise ValueError(f"--storage-options is not valid JSON ({e.__class__.__name__} at "
                         f"character {e.pos}); pass a JSON object, e.g. "
                         """'{"anon": true}'""") from None
    if not isinstance(value, dict):
        raise ValueError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return value


def _one_line(e: BaseException) -> str:
    """An error's message on one line (KeyError quotes its message: unquoted here)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str) \
        else str(e)
    return text.replace("\n", " ")


def _scan_folder(src: Path) -> tuple[list[tuple[str, Path, int | None]], list[str] | None]:
    dirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = sorted(p for p in src.iterdir() if p.is_file() and p.suffix.lower() in _SRC_EXTS)
    if dirs and files:
        raise DataError(f"{src}: has both class sub-folders and loose images; use one layout")
    if not dirs:
        return [(p.stem, p, None) for p in files], None
    items = []
    for label, d in enumerate(dirs):
        for p in sorted(d.rglob("*")):
            if p.is_file() and p.suffix.lower() in _SRC_EXTS:
                rel = p.relative_to(d).with_suffix("").as_posix()
                items.append((f"{d.name}/{rel}", p, label))
    return items, [d.name for d in dirs]


def _unique_keys(items: list[tuple[str, Path, int | None]]) -> Iterator[tuple[str, bytes, int | None]]:
    seen: set[str] = set()
    for key, path, label in items:
        k = _clean_key(key).replace("/", "_")
        base, i = k, 1
        while k in seen:
            k, i = f"{base}_{i}", i + 1
        seen.add(k)
        yield k, path.read_bytes(), label


def _cmd_make(a: argparse.Namespace) -> int:
    src = Path(a.src)
    if not src.is_dir():
        print(f"shards make: {src} is not a folder", file=sys.stderr)
        return 2
    items, classes = _scan_folder(src)
    if not items:
        print(f"shards make: no images under {src}", file=sys.stderr)
        return 2
    if a.shuffle:
        random.Random(a.seed).shuffle(items)
    progress, written = _Progress(len(items), "images"), [0]

    def on_shard(e: ShardEntry) -> None:
        written[0] += e.samples
        progress.line(written[0], f"{e.shard}: {e.samples} samples, {(e.bytes or 0) / 1e6:.1f} MB")

    man = write_shards(_unique_keys(items), a.out, prefix=a.prefix, max_count=a.max_count,
                       max_bytes=a.max_bytes, reencode_baseline=a.reencode, compress=a.gzip,
                       classes=classes, quality=a.quality, on_shard=on_shard)
    skipped = man.extra.get("skipped", [])
    _say(f"wrote {len(man.shards)} shards, {man.num_samples} samples"
         f"{f', {len(classes)} classes' if classes else ' (unlabelled)'} to {a.out}")
    if skipped:
        hint = "" if a.reencode else " (not JPEG/PNG/WebP or corrupt; --reencode converts other formats)"
        print(f"skipped {len(skipped)} images{hint}: {', '.join(skipped[:5])}"
              f"{' ...' if len(skipped) > 5 else ''}")
    return 0


def _cmd_verify(a: argparse.Namespace) -> int:
    progress: _Progress | None = None

    def on_check(c: ShardCheck, done: int, total: int) -> None:
        nonlocal progress
        if progress is None or done == 1:  # a new folder (verify_tree: one per sub-folder)
            progress = _Progress(total, "shards")
        progress.line(done, mask(f"{'ok ' if c.ok else 'BAD'} {c.shard}"))

    try:
        reports = verify_tree(a.source, _storage_options(a.storage_options),
                              workers=a.workers, validate=a.validate,
                              max_member_bytes=a.max_member_bytes, on_check=on_check)
    except (StorageError, ValueError, KeyError) as e:
        _say(f"shards verify: {_one_line(e)}", sys.stderr)
        return 2
    bad: list[str] = []
    for rep in reports:
        for c in rep.shards:
            tag = f"{c.split}/" if c.split else ""
            _say(f"{'ok ' if c.ok else 'BAD'} {tag}{c.shard}: {c.samples} samples"
                 + ("" if c.ok else " -- " + "; ".join(c.problems)))
        if rep.manifest.endswith(f"(no {MANIFEST_NAME})"):
            _say(f"no {MANIFEST_NAME}: checked that each shard reads, not its counts or "
                 "checksums; `sslstream shards index SOURCE` writes one")
        if rep.ok:
            _say(f"all {len(rep.shards)} shards of {rep.manifest} verified")
        else:
            _say(f"{len(rep.bad)} of {len(rep.shards)} shards of {rep.manifest} bad: "
                 f"{', '.join(c.shard for c in rep.bad)}", sys.stderr)
            bad += [c.shard for c in rep.bad]
    return 1 if bad else 0


def _cmd_index(a: argparse.Namespace) -> int:
    progress: _Progress | None = None

    def on_shard(r: IndexedShard, done: int, total: int) -> None:
        nonlocal progress
        progress = progress or _Progress(total, "shards")
        progress.line(done, mask(f"{'ok ' if not r.problem else 'BAD'} "
                                 f"{r.url.rsplit('/', 1)[-1]}: {r.samples} samples, "
                                 f"{r.bytes / 1e6:.1f} MB"))

    try:
        murl, man, shards = index_shards(a.source, _storage_options(a.storage_options),
                                         workers=a.workers, label_key=a.label_key,
                                    output=a.output, max_member_bytes=a.max_member_bytes,
                                    on_shard=on_shard)
    except (StorageError, ValueError, KeyError) as e:
        _say(f"shards index: {_one_line(e)}", sys.stderr)
        return 2
    cls = f", {len(man.classes)} classes" if man.classes else " (unlabelled)"
    unlabelled = sum(s.unlabelled for s in shards)
    _say(f"wrote {murl}: {len(man.shards)} shards, {man.num_samples} samples{cls}, "
         f"label_key={man.extra.get('label_key')}"
         + (f"; {unlabelled} samples have no label under it" if unlabelled else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sslstream shards", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make", help="image folder (one sub-folder per class, or flat) -> shards")
    m.add_argument("src")
    m.add_argument("out", help="output folder or URL (s3://bucket/prefix)")
    m.add_argument("--prefix", default="shard")
    m.add_argument("--max-count", type=int, default=10_000)
    m.add_argument("--max-bytes", type=int, default=1 << 30)
    m.add_argument("--reencode", action="store_true", help="re-encode as baseline JPEG (PIL)")
    m.add_argument("--quality", type=int, default=95)
    m.add_argument("--gzip", action="store_true", help="write .tar.gz shards")
    m.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                   help="keep folder order (default: shuffle so classes mix across shards)")
    m.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("verify", help="check shards (against their manifest.json if any)")
    v.add_argument("source", help="folder, object-store prefix, manifest.json URL, brace "
                   "pattern or one shard")
    v.add_argument("--workers", type=int, default=4)
    v.add_argument("--validate", choices=("header", "decode"), default="header")
    v.add_argument("--storage-options", default=None, help="fsspec options as JSON")
    v.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                   help="largest tar member accepted (docs/data.md, Limits)")
    x = sub.add_parser("index", help="write manifest.json for shards made by any tool")
    x.add_argument("source", help="folder, object-store prefix, brace pattern or one shard")
    x.add_argument("--output", default=None, help="manifest URL (default: beside the shards)")
    x.add_argument("--label-key", default="auto", help="cls | json:<field> | txt | none | auto")
    x.add_argument("--workers", type=int, default=4)
    x.add_argument("--storage-options", default=None, help="fsspec options as JSON")
    x.add_argument("--max-member-bytes", type=int, default=DEFAULT_MAX_MEMBER_BYTES,
                   help="largest tar member accepted (docs/data.md, Limits)")
    remember(list(sys.argv[1:] if argv is None else argv))  # URLs, --storage-options
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    install_log_masking()
    return {"make": _cmd_make, "verify": _cmd_verify, "index": _cmd_index}[a.cmd](a)


if __name__ == "__main__":
    raise SystemExit(main())
