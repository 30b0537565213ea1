"""What data a model was trained on: a snapshot of a shard source, and the run key.

Why: the retraining job must answer "is there anything new since the champion was
trained?" without reading the data, and a retry after a crash must find the run it
started before. Both come from one small record:

- a *snapshot* lists every shard of the source with a fingerprint of its content (the
  manifest's sha256 when there is one, else the object store's ETag / md5, else size and
  mtime for plain files); its id is the sha256 of the sorted (name, fingerprint) list, so
  the same bytes under the same names give the same id on any machine;
- the *run key* combines the snapshot id with a hash of the training-relevant config, and
  names the run (checkpoint folder, MLflow run, registry tag): same data + same config ->
  same run, which is what makes `sslstream retrain` safe to retry.

Shard listing and URL expansion are `sslstream.pipelines.shards.manifest.resolve_shards` (the same rule the
training stream uses, so the snapshot is exactly what training reads).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.manifest import SHARD_SUFFIXES, ShardRef, resolve_shards
from sslstream.pipelines.shards.mix import flat_urls, parse_sources
from sslstream.pipelines.shards.storage import get_fs, open_reader, plain, with_retries

SNAPSHOT_VERSION = 1


@dataclass(frozen=True)
class ShardFingerprint:
    name: str         # path relative to the source's folder / prefix
    url: str          # absolute URL training reads
    fingerprint: str  # "sha256:<hex>" | "etag:<etag>" | "md5:<hex>" | "size:<n>:mtime:<t>"
    samples: int | None = None


@dataclass(frozen=True)
class Snapshot:
    source: str
    shards: tuple[ShardFingerprint, ...]  # sorted by name
    # shards found beside a manifest that does not list them (taken in; not part of the id
    # beyond their fingerprints): reported on every call with the fix, `shards index`
    unlisted: tuple[str, ...] = field(default=(), compare=False)

    def note(self) -> str:
        """'' or the line saying that shards were taken in from outside the manifest."""
        if not self.unlisted:
            return ""
        return (f"{len(self.unlisted)} shard(s) not in the manifest were taken in (counted by "
                f"reading them); list them: sslstream shards index {source_base(self.source)}")

    @property
    def id(self) -> str:
        return snapshot_id((s.name, s.fingerprint) for s in self.shards)

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.shards]

    def fingerprints(self) -> dict[str, str]:
        return {s.name: s.fingerprint for s in self.shards}

    def new_since(self, previous: Mapping[str, str]) -> list[ShardFingerprint]:
        """Shards absent from `previous` (name -> fingerprint) or whose content changed."""
        return [s for s in self.shards if previous.get(s.name) != s.fingerprint]

    def to_dict(self) -> dict[str, Any]:
        return {"version": SNAPSHOT_VERSION, "id": self.id, "source": self.source,
                "shards": [asdict(s) for s in self.shards]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Snapshot:
        shards = tuple(ShardFingerprint(**s) for s in d["shards"])
        snap = cls(str(d["source"]), shards)
        if d.get("id") and d["id"] != snap.id:
            raise DataError(f"snapshot listing of {d['source']} is inconsistent: recorded id "
                             f"{d['id']} != recomputed {snap.id}")
        return snap


def snapshot_id(pairs: Iterable[tuple[str, str]]) -> str:
    """sha256 over the sorted (shard name, fingerprint) pairs."""
    canon = json.dumps(sorted([n, f] for n, f in pairs), separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()


def source_base(source: str | Sequence[str]) -> str:
    """The folder / prefix that shard names are taken relative to."""
    if not isinstance(source, str):
        bases = [source_base(s) for s in source]
        return posixpath.commonpath(bases) if bases and all("://" not in b for b in bases) \
            else _common_url_prefix(bases)
    url = source.partition("#")[0]
    if "{" in url:
        url = url[: url.index("{")]
        return url.rsplit("/", 1)[0] if "/" in url else "."
    if url.endswith(".json") or url.endswith(SHARD_SUFFIXES):
        return url.rsplit("/", 1)[0] if "/" in url else "."
    return url.rstrip("/")


def _common_url_prefix(urls: list[str]) -> str:
    prefix = posixpath.commonprefix(urls)
    return prefix.rsplit("/", 1)[0] if "/" in prefix else ""


def _relative(url: str, base: str) -> str:
    if base and url.startswith(base.rstrip("/") + "/"):
        return url[len(base.rstrip("/")) + 1 :]
    return url


def fingerprint_from_info(info: Mapping[str, Any]) -> str | None:
    """What identifies an object's content in its store's listing / info (ETag, md5,
    crc32c, else size and mtime); None when the store reports none of them."""
    for key, label in (("ETag", "etag"), ("etag", "etag"), ("md5Hash", "md5"),
                       ("crc32c", "crc32c")):
        if info.get(key):
            return f"{label}:{str(info[key]).strip(chr(34))}"
    if info.get("size") is not None and info.get("mtime") is not None:
        return f"size:{int(info['size'])}:mtime:{float(info['mtime']):.6f}"
    if info.get("size") is not None and info.get("LastModified") is not None:
        return f"size:{int(info['size'])}:mtime:{info['LastModified']}"
    return None


def _listing_infos(refs: list[ShardRef], storage_options: dict | None) -> dict[str, dict]:
    """fs info of every shard without a sha256: one listing per folder, not one call each."""
    todo = [r for r in refs if not r.sha256 and r.listed]
    if not todo:
        return {}
    fs, _ = get_fs(todo[0].url, storage_options)
    out: dict[str, dict] = {}
    by_dir: dict[str, list[ShardRef]] = {}
    for r in todo:
        by_dir.setdefault(r.url.rsplit("/", 1)[0], []).append(r)
    for folder, members in by_dir.items():
        _, path = get_fs(folder, storage_options)
        listed = {posixpath.basename(str(i["name"]).rstrip("/")): i
                  for i in with_retries(lambda path=path: fs.ls(path, detail=True), folder,
                                        what="listing")}
        for r in members:
            info = listed.get(posixpath.basename(r.url))
            out[r.url] = info if info is not None else with_retries(
                lambda r=r: fs.info(get_fs(r.url, storage_options)[1]), r.url, what="listing")
    return out


def _sha256_of(url: str, storage_options: dict | None) -> str:
    h = hashlib.sha256()
    with open_reader(url, storage_options) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def take_snapshot(source: str | Sequence[Any], storage_options: dict | None = None) -> Snapshot:
    """List and fingerprint the shards of `source` (of every source of a weighted mix: a
    change in any one of them changes the id). Storage errors propagate (they name the URL)."""
    source = flat_urls(source)
    refs, _ = resolve_shards(source, storage_options)
    infos = _listing_infos(refs, storage_options)
    base = source_base(source)
    shards = []
    for r in refs:
        if not r.listed:  # beside a manifest that does not list it: by content, so that
            # `shards index` (which records this same sha256) leaves the snapshot id alone
            fp = f"sha256:{_sha256_of(r.url, storage_options)}"
        elif r.sha256:
            fp = f"sha256:{r.sha256}"
        else:
            fp = fingerprint_from_info(infos.get(r.url, {}))
        if fp is None:
            raise DataError(f"cannot fingerprint shard {r.url}: its store reports no "
                             "checksum, ETag, size or mtime; add a manifest.json with sha256")
        shards.append(ShardFingerprint(_relative(r.url, base), r.url, fp, r.samples))
    names = [s.name for s in shards]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise DataError(f"retrain.source={source!r} names the same shard twice: {dup[:5]}")
    label = source if isinstance(source, str) else ",".join(source)
    return Snapshot(label, tuple(sorted(shards, key=lambda s: s.name)),
                    tuple(r.url for r in refs if not r.listed))


def pin_sources(spec: str | Sequence[Any], snap: Snapshot,
                storage_options: dict | None = None) -> str | list[Any]:
    """`spec` (a `data.train` value) read exactly at `snap`: a plain spec becomes the
    snapshot's shard URLs; a weighted mix keeps its sources and their weights, each source's
    `url` becoming its shards that the snapshot holds (in the source's own order)."""
    sources = parse_sources(plain(spec)) if not isinstance(spec, str) else None
    if sources is None:
        return snap.urls
    taken = set(snap.urls)
    out: list[Any] = []
    for i, (src, item) in enumerate(zip(sources, plain(spec), strict=True)):
        refs, _ = resolve_shards(src.urls, storage_options)
        urls = [r.url for r in refs if r.url in taken]
        if not urls:
            raise DataError(f"source {i} of the mix ({src.label}) has no shard in the snapshot "
                            f"{snap.id[:12]}: it changed while being read; run again")
        entry = dict(item) if isinstance(item, Mapping) else {}
        out.append({**entry, "url": urls})
    return out


def data_tags(train: str | Sequence[Any], storage_options: dict | None = None
              ) -> dict[str, str]:
    """Registry tags naming the training data: ``data_manifest_hash`` = ``sha256:<snapshot id>``
    (same bytes under the same names -> same hash, on any machine) and ``data_shards``."""
    snap = take_snapshot(train, storage_options)
    return {"data_manifest_hash": f"sha256:{snap.id}", "data_shards": str(len(snap.shards))}
