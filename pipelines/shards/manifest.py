"""manifest.json and the resolution of shard URLs (folders, manifests, brace patterns).

Why a manifest: equal per-rank sample counts need every shard's sample count before the
first byte is read; reading them from one small JSON file beats a counting pass over the
data (which is the fallback, cached per process). sha256 and bytes make `verify` possible.

Layouts read: the default `{"shards": [...], "classes": [...]}` and the split layout of
the CIFAR-10 shards, `{"train": [...], "test": [...], "classes": [...]}`.
"""

from __future__ import annotations

import json
import logging
import posixpath
import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import braceexpand
from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.storage import (
    ShardNotFound,
    get_fs,
    open_reader,
    read_bytes,
    with_retries,
)

log = logging.getLogger(__name__)

__all__ = [
    "MANIFEST_NAME",
    "Manifest",
    "ShardEntry",
    "ShardRef",
    "count_samples",
    "join_url",
    "load_manifest",
    "resolve_shards",
]

MANIFEST_NAME = "manifest.json"
SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")


@dataclass
class ShardEntry:
    shard: str  # file name relative to the manifest's folder
    samples: int
    sha256: str | None = None
    bytes: int | None = None


@dataclass
class Manifest:
    shards: list[ShardEntry] = field(default_factory=list)
    classes: list[str] | None = None
    splits: dict[str, list[ShardEntry]] = field(default_factory=dict)  # CIFAR layout
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level keys, kept

    @property
    def num_samples(self) -> int:
        return sum(e.samples for e in self.all_entries())

    def all_entries(self) -> list[ShardEntry]:
        return list(self.shards) + [e for es in self.splits.values() for e in es]

    def entries(self, split: str | None = None) -> list[ShardEntry]:
        """The shards of `split` (CIFAR layout), or the default list; errors name the choices."""
        if split:
            if split in self.splits:
                return list(self.splits[split])
            if split == "shards" and self.shards:
                return list(self.shards)
            raise KeyError(f"manifest has no split {split!r} (has: {sorted(self.splits) or ['shards']})")
        if self.shards:
            return list(self.shards)
        if len(self.splits) == 1:
            return list(next(iter(self.splits.values())))
        raise KeyError(
            f"manifest has splits {sorted(self.splits)}: pick one with URL#split "
            "(e.g. .../cifar10#train) or a brace pattern"
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = dict(self.extra)
        if self.classes is not None:
            d["classes"] = list(self.classes)
        if self.shards or not self.splits:
            d["shards"] = [asdict(e) for e in self.shards]
        for name, es in self.splits.items():
            d[name] = [asdict(e) for e in es]
        return d

    @classmethod
    def from_dict(cls, d: Any, *, source: str = "manifest") -> Manifest:
        """Parse a manifest's JSON document; every field is checked for its type, and a
        wrong one is a DataError naming the manifest, the field and the fix."""
        fix = ("rewrite it with `sslstream shards index <folder>` (or `shards make`), or "
               "fix it by hand (docs/data.md, manifest.json)")
        if not isinstance(d, dict):
            raise DataError(f"{source}: a JSON object expected, not a {type(d).__name__}; {fix}")

        def entries(items: Any, where: str) -> list[ShardEntry]:
            if not isinstance(items, list):
                raise DataError(f"{source}: {where} must be a list of shard entries, not a "
                                f"{type(items).__name__}; {fix}")
            return [_entry(it, f"{where}[{i}]", source, fix) for i, it in enumerate(items)]

        classes = d.get("classes")
        if classes is not None and not (isinstance(classes, list)
                                        and all(isinstance(c, str | int) for c in classes)):
            raise DataError(f"{source}: classes must be a list of class names; {fix}")
        m = cls(classes=[str(c) for c in classes] if classes is not None else None)
        for k, v in d.items():
            if k == "shards":
                m.shards = entries(v, k)
            elif k == "classes":
                continue
            elif isinstance(v, list) and v and isinstance(v[0], dict) and "shard" in v[0]:
                m.splits[k] = entries(v, k)
            else:
                m.extra[k] = v
        if not m.shards and not m.splits:
            raise DataError(f"{source}: no 'shards' list and no split lists of shard entries")
        return m


def _entry(it: Any, where: str, source: str, fix: str) -> ShardEntry:
    """One shard entry, every field of its type ({"shard": str, "samples": int >= 0,
    "sha256": hex str | null, "bytes": int >= 0 | null})."""
    def bad(what: str) -> DataError:
        return DataError(f"{source}: {where} {what}; {fix}")

    if not isinstance(it, dict):
        raise bad(f"is not a shard entry (a {type(it).__name__}, not an object)")
    shard, samples = it.get("shard"), it.get("samples")
    sha, size = it.get("sha256"), it.get("bytes")
    if not isinstance(shard, str) or not shard:
        raise bad('has no "shard" file name')
    if not _count(samples):
        raise bad('"samples" must be a count (an integer >= 0)')
    if sha == "":
        sha = None
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64
                                and all(c in "0123456789abcdef" for c in sha.lower())):
        raise bad('"sha256" must be 64 hex digits or null')
    if size is not None and not _count(size):
        raise bad('"bytes" must be an integer >= 0 or null')
    return ShardEntry(shard, samples, sha, size)


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: absolute URL and, when known, its sample count and checksum."""

    url: str
    samples: int | None = None
    sha256: str | None = None
    bytes: int | None = None
    listed: bool = True  # False: found beside a manifest that does not list it


def join_url(base: str, name: str) -> str:
    if "://" in name or name.startswith("/"):
        return name
    return posixpath.join(base.rstrip("/"), name) if "://" in base else str(posixpath.join(base, name))


def _dirname(url: str) -> str:
    return url.rsplit("/", 1)[0] if "/" in url else "."


def load_manifest(url: str, storage_options: dict | None = None) -> Manifest:
    """Parse the manifest at `url` (errors name the URL)."""
    raw = read_bytes(url, storage_options)
    try:
        d = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{url}: not valid JSON ({e})") from None
    return Manifest.from_dict(d, source=url)


def _try_manifest(url: str, storage_options: dict | None) -> Manifest | None:
    try:
        return load_manifest(url, storage_options)
    except ShardNotFound:
        return None


def _refs(base: str, entries: list[ShardEntry]) -> list[ShardRef]:
    return [ShardRef(join_url(base, e.shard), e.samples, e.sha256, e.bytes) for e in entries]


def _is_shard(url: str) -> bool:
    return url.endswith(SHARD_SUFFIXES)


def _resolve_one(url: str, so: dict | None, cache: dict[str, Manifest | None]) -> tuple[list[ShardRef], list[str] | None]:
    url, _, split = url.partition("#")
    split = split or None
    expanded = list(braceexpand.braceexpand(url))
    if len(expanded) > 1 or _is_shard(url):
        refs, classes = [], None
        for u in expanded:
            d = _dirname(u)
            if d not in cache:
                cache[d] = _try_manifest(join_url(d, MANIFEST_NAME), so)
            man = cache[d]
            known = {join_url(d, e.shard): e for e in man.all_entries()} if man else {}
            e = known.get(u)
            refs.append(ShardRef(u, e.samples, e.sha256, e.bytes) if e else ShardRef(u))
            if man is not None and man.classes is not None:
                classes = man.classes
        return refs, classes
    if url.endswith(".json"):
        man = load_manifest(url, so)
        return _refs(_dirname(url), man.entries(split)), man.classes
    # a folder or object-store prefix
    man = _try_manifest(join_url(url, MANIFEST_NAME), so)
    names = _folder_shards(url, so)
    if man is not None:
        return _reconcile(url, man, split, names), man.classes
    if not names:
        raise ShardNotFound(f"no {MANIFEST_NAME} and no *.tar/*.tar.gz shards under {url}", url)
    return [ShardRef(u) for u in names], None


def _folder_shards(url: str, so: dict | None) -> list[str]:
    """URLs of the *.tar / *.tar.gz / *.tgz directly under a folder or prefix, sorted."""
    fs, path = get_fs(url, so)
    found = with_retries(
        lambda: {p for suf in SHARD_SUFFIXES for p in fs.glob(posixpath.join(path, "*" + suf))},
        url, what="listing")
    return [join_url(url, posixpath.basename(p)) for p in sorted(found)]


def _reconcile(url: str, man: Manifest, split: str | None, present: list[str]) -> list[ShardRef]:
    """The rule for a watched folder whose shards and manifest disagree (docs/data.md):

    - a shard the manifest lists that is not there: ShardNotFound naming it and the fix;
    - shards there that the manifest does not list: taken in (after the listed ones,
      counted by one read, fingerprinted by the store in a snapshot) with a warning on
      every call -- unless the manifest has splits (which split would they be?): then
      left out, with a warning on every call. Either way the warning names the count and
      the fix, `sslstream shards index`.
    """
    refs = _refs(url, man.entries(split))
    here = set(present)
    top = [r.url for r in refs if join_url(url, posixpath.basename(r.url)) == r.url]
    missing = [u for u in top if u not in here]
    if missing:
        raise ShardNotFound(
            f"{missing[0]} does not exist: {join_url(url, MANIFEST_NAME)} lists {len(missing)} "
            f"shard(s) that are not under {url}; restore them, or rewrite the manifest from "
            f"what is there: sslstream shards index {url}", missing[0])
    known = {join_url(url, e.shard) for e in man.all_entries()}
    extra = [u for u in present if u not in known]
    if not extra:
        return refs
    names = ", ".join(posixpath.basename(u) for u in extra[:3]) + (" ..." if len(extra) > 3 else "")
    if man.splits and not man.shards:
        log.warning("%d shard(s) under %s are not in its split manifest and are LEFT OUT (%s); "
                    "list them: sslstream shards index %s --output ... or edit %s", len(extra),
                    url, names, url, MANIFEST_NAME)
        return refs
    log.warning("%d shard(s) under %s are not in its %s: taken in, counted by reading them "
                "(%s); to list them with counts and checksums: sslstream shards index %s",
                len(extra), url, MANIFEST_NAME, names, url)
    return refs + [ShardRef(u, listed=False) for u in extra]


def resolve_shards(urls: str | Sequence[str], storage_options: dict | None = None) -> tuple[list[ShardRef], list[str] | None]:
    """Expand `urls` into shard references (with counts where a manifest gives them).

    Accepts a folder / prefix (its manifest.json, else its *.tar*), a manifest URL, a
    brace pattern, a single shard, or a list of any of these; `URL#split` picks a split
    of a CIFAR-layout manifest. Counts of shards named by pattern come from a
    manifest.json beside them when there is one.
    """
    items = [urls] if isinstance(urls, str) else list(urls)
    if not items:
        raise DataError("no shard URLs given")
    cache: dict[str, Manifest | None] = {}
    refs: list[ShardRef] = []
    classes: list[str] | None = None
    for u in items:
        r, c = _resolve_one(str(u), storage_options, cache)
        refs.extend(r)
        classes = classes or c
    return refs, classes


_count_cache: dict[tuple[str, int], int] = {}
_count_lock = threading.Lock()


def count_samples(url: str, storage_options: dict | None = None, *,
                  max_member_bytes: int | None = None,
                  stop: Callable[[], bool] | None = None) -> int:
    """Number of samples (keys) in a shard: one full read, cached per (URL, size) per
    process. `max_member_bytes` and `stop`: as in tario.iter_tar_samples."""
    from sslstream.pipelines.shards.tario import (
        DEFAULT_MAX_MEMBER_BYTES,
        ShardEnded,
        iter_tar_samples,
    )

    with open_reader(url, storage_options) as f:
        size = f.raw.size  # type: ignore[attr-defined]
        with _count_lock:
            if (url, size) in _count_cache:
                return _count_cache[(url, size)]
        n = 0
        try:
            for _ in iter_tar_samples(f, stop=stop,
                                      max_member_bytes=max_member_bytes or DEFAULT_MAX_MEMBER_BYTES):
                n += 1
        except ShardEnded as e:
            n = e.samples
    with _count_lock:
        _count_cache[(url, size)] = n
    return n
