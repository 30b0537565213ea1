"""`sslstream shards index SOURCE`: a manifest.json for shards that another tool wrote.

Why: webdataset's ShardWriter, img2dataset or `tar` leave no manifest, so the stream pays a
counting read per shard on every start, `shards verify` has nothing to check against and a
watched folder's snapshot cannot tell content from names. One pass over each shard
(parallel, with progress) gives its samples, bytes and sha256 and, when the shards are
labelled, the classes; the manifest is written beside the shards (atomically on local
disk; object stores replace an object whole).

It also finds the one layout mistake other tools make that reads as corruption: members of
a key that are not adjacent (`tar czf` of a directory stores files in directory order, so
000001.jpg and 000001.cls are far apart). A tar reader then sees each key twice, half a
sample each time; the problem names the cause and the fix instead of "missing image".
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any

import braceexpand
from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.labels import (
    LABEL_KEYS,
    BadLabel,
    LabelKey,
    describe_members,
    detect_label_key,
    first_samples,
    parse_label_key,
    read_label,
)
from sslstream.pipelines.shards.manifest import (
    MANIFEST_NAME,
    SHARD_SUFFIXES,
    Manifest,
    ShardEntry,
    join_url,
    load_manifest,
)
from sslstream.pipelines.shards.parallel import run_each
from sslstream.pipelines.shards.storage import ShardNotFound, get_fs, open_reader, with_retries
from sslstream.pipelines.shards.tario import (
    DEFAULT_MAX_MEMBER_BYTES,
    ShardEnded,
    iter_tar_samples,
)

__all__ = ["IndexedShard", "NON_ADJACENT_FIX", "index_shards", "list_shards", "scan_shard"]

NON_ADJACENT_FIX = (
    "the tar's members are not grouped by key (member order: e.g. `tar czf` of a folder "
    "stores files in directory order); re-create it with members sorted by name "
    "(`tar cf out.tar --sort=name -C DIR .`, or `sslstream shards make DIR OUT`)")


class HashingReader(io.RawIOBase):
    """Counts and hashes the bytes read through it (the stored bytes)."""

    def __init__(self, f: IO[bytes]) -> None:
        super().__init__()
        self.f, self.sha, self.n = f, hashlib.sha256(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self.f.read(len(b))
        b[: len(data)] = data
        self.sha.update(data)
        self.n += len(data)
        return len(data)


@dataclass
class IndexedShard:
    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    labels: set[int | str] = field(default_factory=set)
    unlabelled: int = 0
    first_unlabelled: str | None = None
    repeated_keys: int = 0  # keys met again after other keys: members not adjacent
    first_repeated: str | None = None
    problem: str | None = None  # unreadable after n samples, ...


def _is_shard(url: str) -> bool:
    return url.endswith(SHARD_SUFFIXES)


def list_shards(source: str, storage_options: dict | None = None) -> tuple[str, list[str]]:
    """(base folder, shard URLs) of a folder / prefix (its *.tar, *.tar.gz, *.tgz; any
    manifest.json there is ignored), a brace pattern or a single shard."""
    src = source.partition("#")[0]
    expanded = list(braceexpand.braceexpand(src))
    if len(expanded) > 1 or _is_shard(src):
        base = expanded[0].rsplit("/", 1)[0] if "/" in expanded[0] else "."
        return base, expanded
    fs, path = get_fs(src, storage_options)
    names = sorted(with_retries(
        lambda: {p for suf in SHARD_SUFFIXES for p in fs.glob(posixpath.join(path, "*" + suf))},
        src, what="listing"))
    if not names:
        raise ShardNotFound(f"no *.tar / *.tar.gz / *.tgz shards under {src}", src)
    base = src.rstrip("/")
    return base, [join_url(base, posixpath.basename(p)) for p in names]


def _raw_label(parts: dict[str, bytes], key: LabelKey) -> int | str | None:
    """The label as found: an int, a class name (a json field's string), or None when the
    sample has no such member or field. BadLabel for anything else: a `.cls` / `.txt` that
    is not an integer, a `.json` that is not JSON, a json value that is neither."""
    try:
        return read_label(parts, key, None)
    except BadLabel:
        name = _json_class_name(parts, key) if key.kind == "json" else None
        if name is None:
            raise
        return name


def _json_class_name(parts: dict[str, bytes], key: LabelKey) -> str | None:
    """The json field's value when it is a non-empty string (a class name), else None."""
    try:
        doc = json.loads(parts["json"])
    except ValueError:
        return None
    value = doc.get(key.field) if isinstance(doc, dict) else None
    return value.strip() if isinstance(value, str) and value.strip() else None


def scan_shard(url: str, storage_options: dict | None = None,
               label_key: LabelKey | None = None,
               on_sample: Callable[[str, dict[str, bytes]], None] | None = None, *,
               max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
               stop: Callable[[], bool] | None = None) -> IndexedShard:
    """One pass over a shard: samples, bytes, sha256, labels, member adjacency. A label
    that `label_key` cannot read is the shard's problem, naming the sample; `stop()` (when
    given) ends the read early (tario.Stopped)."""
    out = IndexedShard(url)
    seen: set[str] = set()
    key_ = label_key or LabelKey("none")
    with open_reader(url, storage_options) as raw:
        hr = HashingReader(raw)
        try:
            for key, parts in iter_tar_samples(io.BufferedReader(hr, 1 << 20), stop=stop,
                                               max_member_bytes=max_member_bytes):
                if key in seen:
                    out.repeated_keys += 1
                    out.first_repeated = out.first_repeated or key
                    continue
                seen.add(key)
                out.samples += 1
                if key_.kind != "none":
                    try:
                        lbl = _raw_label(parts, key_)
                    except BadLabel as e:
                        out.problem = (f"sample {key}: label_key={key_} reads {e}; fix the "
                                       f"sample, or index with another --label-key ({LABEL_KEYS})")
                        break
                    if lbl is None:
                        out.unlabelled += 1
                        out.first_unlabelled = out.first_unlabelled or key
                    else:
                        out.labels.add(lbl)
                if on_sample is not None:
                    on_sample(key, parts)
        except ShardEnded as e:
            out.problem = f"unreadable after {e.samples} samples ({e.reason})"
        while not (stop and stop()) and hr.read(1 << 20):  # hash the tail the reader skipped
            pass
    out.bytes, out.sha256 = hr.n, hr.sha.hexdigest()
    if out.repeated_keys:
        out.problem = (f"{out.repeated_keys} keys (first: {out.first_repeated}) appear again "
                       f"after other keys: {NON_ADJACENT_FIX}")
    return out


def _classes(found: set[int | str], previous: list[str] | None) -> list[str] | None:
    if not found:
        return None
    ints = {v for v in found if isinstance(v, int)}
    names = sorted(str(v) for v in found if not isinstance(v, int))
    if previous is not None and (not ints or max(ints) < len(previous)) \
            and set(names) <= set(previous):
        return previous
    if names:
        return names  # class names (json {"label": "cat"}): their sorted order is the index
    return [str(i) for i in range(max(ints) + 1)]


def index_shards(source: str, storage_options: dict | None = None, *, workers: int = 4,
                 label_key: str = "auto", output: str | None = None,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
                 on_shard: Callable[[IndexedShard, int, int], None] | None = None
                 ) -> tuple[str, Manifest, list[IndexedShard]]:
    """Scan every shard of `source` and write manifest.json (to `output`, default beside
    the shards). Returns (manifest URL, manifest, per-shard results). Raises DataError
    naming the shards that cannot be indexed (unreadable, members not adjacent, a label
    `label_key` cannot read) and when a given `label_key` labels no sample at all: a
    manifest must not describe data the stream would read differently."""
    base, urls = list_shards(source, storage_options)
    murl = output or join_url(base, MANIFEST_NAME)
    try:
        previous = load_manifest(murl, storage_options).classes
    except (ShardNotFound, ValueError):
        previous = None
    key = parse_label_key(label_key)
    if key.kind == "auto":
        key = detect_label_key([p for _, p in first_samples(urls[0], storage_options)], previous)
    shards = run_each(lambda u, stop: scan_shard(u, storage_options, key, stop=stop,
                                                 max_member_bytes=max_member_bytes),
                      urls, workers=workers, on_done=on_shard, name="sslstream-index")
    bad = [s for s in shards if s.problem]
    if bad:
        raise DataError("cannot index " + "; ".join(f"{s.url}: {s.problem}" for s in bad[:5])
                         + (f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""))
    if key.kind != "none" and not any(s.labels for s in shards):
        first = next(s for s in shards if s.first_unlabelled)
        raise DataError(
            f"cannot index {source}: label_key={key} gives none of its "
            f"{sum(s.samples for s in shards)} samples a label (first: {first.first_unlabelled} "
            f"in {first.url}; members seen: {_members_seen(urls[0], storage_options)}). Fix: "
            f"--label-key naming the member that holds the class ({LABEL_KEYS}), or "
            "--label-key none for unlabelled shards")
    mbase = murl.rsplit("/", 1)[0] if "/" in murl else "."
    entries = [ShardEntry(_relative(s.url, mbase), s.samples, s.sha256, s.bytes) for s in shards]
    found = set().union(*(s.labels for s in shards))
    man = Manifest(shards=entries, classes=_classes(found, previous))
    man.extra["label_key"] = str(key)
    man.extra["indexed_by"] = "sslstream shards index"
    _write_json(murl, man.to_dict(), storage_options)
    return murl, man, shards


def _members_seen(url: str, storage_options: dict | None) -> str:
    return describe_members(first_samples(url, storage_options))


def _relative(url: str, base: str) -> str:
    return url[len(base) + 1:] if url.startswith(base.rstrip("/") + "/") else url


def _write_json(url: str, doc: dict, storage_options: dict | None) -> None:
    fs, path = get_fs(url, storage_options)
    data = json.dumps(doc, indent=1).encode()
    if "://" in url and not url.startswith("file://"):
        fs.pipe(path, data)  # one PUT: readers see the old object or the new one
        return
    tmp = posixpath.join(posixpath.dirname(path), f".{posixpath.basename(path)}.tmp")
    fs.pipe(tmp, data)
    fs.mv(tmp, path)
