"""`sslstream shards verify`: every shard read through and checked, against its manifest
entry where there is one.

Why a full read: sha256 and byte counts find silent corruption and partial uploads; the
member walk finds what the stream would skip (bad images, labels) and the one layout
mistake of foreign tars that otherwise reads as corruption (members of a key not adjacent).
Sources: a folder or prefix (its manifest.json, else its shards), a manifest URL, a brace
pattern or a single shard; a folder with neither but with sub-folders that have them (a
data root whose splits sit in train/ and test/) is checked one level down (`verify_tree`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from sslstream.pipelines.shards.indexer import NON_ADJACENT_FIX, HashingReader, list_shards
from sslstream.pipelines.shards.manifest import (
    MANIFEST_NAME,
    SHARD_SUFFIXES,
    Manifest,
    ShardEntry,
    join_url,
    load_manifest,
)
from sslstream.pipelines.shards.parallel import run_each
from sslstream.pipelines.shards.storage import ShardNotFound, StorageError, get_fs, open_reader
from sslstream.pipelines.shards.tario import (
    DEFAULT_MAX_MEMBER_BYTES,
    IMAGE_EXTS,
    ShardEnded,
    Stopped,
    iter_tar_samples,
)
from sslstream.pipelines.shards.validate import DEFAULT_MAX_PIXELS, CorruptImage, validate_image

__all__ = ["ShardCheck", "VerifyReport", "shard_folders", "verify", "verify_tree"]


@dataclass
class ShardCheck:
    shard: str
    url: str
    split: str | None
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class VerifyReport:
    manifest: str
    shards: list[ShardCheck]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    @property
    def bad(self) -> list[ShardCheck]:
        return [s for s in self.shards if not s.ok]


def _check_shard(job: tuple[ShardEntry, str, str | None], stop: Callable[[], bool], *,
                 so: dict | None, num_classes: int | None, validate: str,
                 max_member_bytes: int) -> ShardCheck:
    """Read one shard (`job`: its entry, URL and split) through; compare with its manifest
    entry (`entry.samples < 0`: no manifest lists it, so only readability, images and
    labels are checked). Returns early, unfinished, once `stop()` is true."""
    entry, url, split = job
    chk = ShardCheck(entry.shard, url, split)
    seen: set[str] = set()
    repeated: list[str] = []
    try:
        with open_reader(url, so) as raw:
            hr = HashingReader(raw)
            bad: dict[str, int] = {}
            try:
                for key, parts in iter_tar_samples(io.BufferedReader(hr, 1 << 20), stop=stop,
                                                   max_member_bytes=max_member_bytes):
                    if key in seen:  # half a sample again: members not adjacent
                        repeated.append(key)
                        continue
                    seen.add(key)
                    chk.samples += 1
                    img = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
                    why = _sample_problem(img, parts.get("cls"), num_classes, validate)
                    if why:
                        bad[why] = bad.get(why, 0) + 1
                        if sum(bad.values()) == 1:
                            chk.problems.append(f"first bad sample {key}: {why}")
            except ShardEnded as e:
                chk.problems.append(f"unreadable after {e.samples} samples ({e.reason})")
            while not stop() and hr.read(1 << 20):  # hash the tail the reader did not need
                pass
    except Stopped:
        return chk
    except StorageError as e:
        chk.problems.append(str(e))
        return chk
    if repeated:  # the cause, not its symptoms (missing images, a doubled count)
        chk.problems[:] = [f"{len(repeated)} keys (first: {repeated[0]}) appear again after "
                           f"other keys: {NON_ADJACENT_FIX}"]
        return chk
    if bad:
        chk.problems.append("bad samples: " + ", ".join(f"{k} x{v}" for k, v in sorted(bad.items())))
    if entry.samples < 0:
        return chk
    if entry.sha256 and hr.sha.hexdigest() != entry.sha256:
        chk.problems.append(f"sha256 {hr.sha.hexdigest()[:12]}... != manifest {entry.sha256[:12]}...")
    if entry.bytes is not None and hr.n != entry.bytes:
        chk.problems.append(f"{hr.n} bytes != manifest {entry.bytes}")
    if chk.samples != entry.samples:
        chk.problems.append(f"{chk.samples} samples != manifest {entry.samples}")
    return chk


def _sample_problem(img: bytes | None, cls: bytes | None, num_classes: int | None,
                    validate: str) -> str | None:
    if img is None:
        return "missing image"
    try:
        validate_image(img, validate, DEFAULT_MAX_PIXELS)
    except CorruptImage as e:
        return e.reason.split(":")[0] if e.reason != "empty" else "empty image"
    if cls is not None:
        try:
            label = int(cls.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return "bad label"
        if label < 0 or (num_classes is not None and label >= num_classes):
            return "bad label"
    return None


def _verify_jobs(src: str, so: dict | None) -> tuple[str, str, list[tuple[ShardEntry, str | None]]]:
    """(label, base, jobs) for a manifest URL, a folder / prefix (its manifest.json, else
    its shards), a brace pattern or a single shard (with the manifest beside it, if any)."""
    if src.endswith(".json"):
        man = load_manifest(src, so)
        base = src.rsplit("/", 1)[0] if "/" in src else "."
        return src, base, [(e, None) for e in man.shards] + \
            [(e, s) for s, es in man.splits.items() for e in es]
    if not (src.endswith(SHARD_SUFFIXES) or "{" in src):
        murl = join_url(src, MANIFEST_NAME)
        try:
            return _verify_jobs(murl, so)
        except ShardNotFound:
            pass
        try:
            base, urls = list_shards(src, so)
        except ShardNotFound:
            raise ShardNotFound(f"{murl} does not exist and there are no *.tar / *.tar.gz / "
                                f"*.tgz shards under {src}", src) from None
    else:
        base, urls = list_shards(src, so)
    try:
        man: Manifest | None = load_manifest(join_url(base, MANIFEST_NAME), so)
    except ShardNotFound:
        man = None
    known = {join_url(base, e.shard): e for e in man.all_entries()} if man else {}
    jobs = [(known.get(u) or ShardEntry(u.rsplit("/", 1)[-1], -1), None) for u in urls]
    label = join_url(base, MANIFEST_NAME) if man else f"{src} (no {MANIFEST_NAME})"
    return label, base, jobs


def verify(source: str, storage_options: dict | None = None, *, workers: int = 4,
           validate: str = "header", max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
           on_check: Callable[[ShardCheck, int, int], None] | None = None) -> VerifyReport:
    """Check every shard of `source` (a folder or prefix, a manifest.json URL, a brace
    pattern or one shard): present, sha256, bytes and count against the manifest where one
    lists the shard, every member readable and grouped by key, every image passing
    `validate`. `source#split` restricts the check to one split of a CIFAR-layout
    manifest. `on_check(check, done, total)` is called as each shard's check completes
    (progress); the report keeps the listing order. An interrupt (KeyboardInterrupt or
    the CLI's Interrupted) ends every shard's read within a chunk (parallel.run_each)."""
    src, _, split = str(source).partition("#")
    label, base, jobs = _verify_jobs(src, storage_options)
    ncls = None
    if not label.endswith(f"(no {MANIFEST_NAME})"):
        man = load_manifest(label, storage_options)
        ncls = len(man.classes) if man.classes else None
    if split:  # SOURCE#split: only that split of a CIFAR-layout manifest
        jobs = [(e, s) for e, s in jobs if s == split or (s is None and split == "shards")]
        if not jobs:
            raise KeyError(f"{label} has no split {split!r}")
    check = partial(_check_shard, so=storage_options, num_classes=ncls, validate=validate,
                    max_member_bytes=max_member_bytes)
    checks = run_each(check, [(e, join_url(base, e.shard), s) for e, s in jobs],
                      workers=workers, on_done=on_check, name="sslstream-verify")
    return VerifyReport(label, checks)


def shard_folders(source: str, storage_options: dict | None = None) -> list[str]:
    """The sub-folders of the folder `source` that hold a manifest.json or shards, sorted
    (one level down; [] for anything else)."""
    if source.endswith((".json", *SHARD_SUFFIXES)) or "{" in source or "#" in source:
        return []
    fs, path = get_fs(source, storage_options)
    try:
        subs = sorted(d["name"] for d in fs.ls(path, detail=True) if d.get("type") == "directory")
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for sub in subs:
        name = sub.rstrip("/").rsplit("/", 1)[-1]
        inner = [fs.exists(f"{sub}/{MANIFEST_NAME}")] + [bool(fs.glob(f"{sub}/*{suf}"))
                                                        for suf in SHARD_SUFFIXES]
        if any(inner):
            found.append(join_url(source, name))
    return found


def verify_tree(source: str, storage_options: dict | None = None, **kwargs) -> list[VerifyReport]:
    """`verify(source)`; where `source` is a folder without a manifest.json or shards of its
    own, `verify` of each sub-folder that has them (`./data/synthetic`: train/ and test/).
    Raises `verify`'s ShardNotFound, naming the folder, when neither level has shards."""
    try:
        return [verify(source, storage_options, **kwargs)]
    except ShardNotFound:
        subs = shard_folders(str(source), storage_options)
        if not subs:
            raise
    return [verify(sub, storage_options, **kwargs) for sub in subs]
