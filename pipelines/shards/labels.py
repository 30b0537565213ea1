"""Which tar members hold a sample's image and its label, for shards made by any tool.

Why: `sslstream shards make` writes `<key>.jpg` + `<key>.cls`, but webdataset's
`ShardWriter`, img2dataset, `tar` of a folder and timm/HF exports use other members:
`.json` with `{"label": 3}`, `.txt` with a class index (or, from img2dataset, a caption),
`.png` / `.webp` images. A label key that reads nothing must not silently become -1 (the
kNN then fails *after* training), so:

- `data.label_key` = `cls` | `json:<field>` | `txt` | `none` | `auto` (default): `auto`
  looks at the first samples of the first shard and takes the first that yields an integer
  label in all of them, in the order cls, json (fields label, cls, class, target), txt;
  else `none` (unlabelled);
- `data.image_keys` = the member extensions tried for the image, in order;
- `require_labels` checks a split that evaluation needs labels from, before training, and
  raises `MissingLabels` naming the split, the members seen and the fix.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sslstream.pipelines.shards.errors import DataError

if TYPE_CHECKING:
    from sslstream.pipelines.shards.cache import ShardCache

__all__ = [
    "DEFAULT_IMAGE_KEYS",
    "JSON_FIELDS",
    "LABEL_KEYS",
    "BadLabel",
    "LabelKey",
    "MissingLabels",
    "describe_members",
    "detect_label_key",
    "first_samples",
    "parse_label_key",
    "read_label",
    "require_labels",
]

DEFAULT_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
LABEL_KEYS = "cls, json:<field>, txt, none or auto"  # the choices, for messages
JSON_FIELDS = ("label", "cls", "class", "target")  # tried in this order by `auto`
DETECT_SAMPLES = 16


class BadLabel(DataError):
    """The label member is there but is not a usable class index."""


class MissingLabels(DataError):
    """A split that evaluation needs labels from yields none (raised before training)."""


@dataclass(frozen=True)
class LabelKey:
    kind: str  # "cls" | "json" | "txt" | "none" | "auto"
    field: str | None = None  # json only

    def __str__(self) -> str:
        return f"json:{self.field}" if self.kind == "json" else self.kind


def parse_label_key(spec: str | LabelKey | None) -> LabelKey:
    """`cls`, `txt`, `none`, `auto` or `json:<field>` (errors list the choices)."""
    if isinstance(spec, LabelKey):
        return spec
    s = "auto" if spec is None else str(spec).strip()
    if s in ("cls", "txt", "none", "auto"):
        return LabelKey(s)
    if s.startswith("json:") and s[5:]:
        return LabelKey("json", s[5:])
    if s == "json":
        return LabelKey("json", "label")
    raise DataError(f"data.label_key={spec!r}: expected {LABEL_KEYS}")


def _to_index(value: object, classes: Sequence[str] | None, where: str) -> int:
    if isinstance(value, bool):
        raise BadLabel(f"{where} = {value!r} is not a class index")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        v = value.strip()
        try:
            return int(v)
        except ValueError:
            if classes is not None and v in classes:
                return list(classes).index(v)
    raise BadLabel(f"{where} = {str(value)[:40]!r} is not a class index"
                   + ("" if classes is None else " or a class name of the manifest"))


def read_label(parts: Mapping[str, bytes], key: LabelKey,
               classes: Sequence[str] | None = None) -> int | None:
    """The label of a sample under `key`: an int, None when the sample has no such member
    (or field); BadLabel when it has one that is not a class index."""
    if key.kind in ("none", "auto"):
        return None
    ext = "json" if key.kind == "json" else key.kind
    raw = parts.get(ext)
    if raw is None:
        return None
    if key.kind == "json":
        try:
            doc = json.loads(raw)
        except ValueError:
            raise BadLabel(f".json is not valid JSON ({raw[:30]!r})") from None
        if not isinstance(doc, dict) or key.field not in doc or doc[key.field] is None:
            return None
        return _to_index(doc[key.field], classes, f".json[{key.field!r}]")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadLabel(f".{ext} = {raw[:20]!r} is not text") from None
    return _to_index(text, classes, f".{ext}")


def _all_label(samples: Sequence[Mapping[str, bytes]], key: LabelKey,
               classes: Sequence[str] | None) -> bool:
    try:
        return all(read_label(p, key, classes) is not None for p in samples)
    except BadLabel:
        return False


def detect_label_key(samples: Sequence[Mapping[str, bytes]],
                     classes: Sequence[str] | None = None) -> LabelKey:
    """`cls` when every sample has a .cls member, else the first key (json:<field>, txt)
    that gives every sample an integer label (or a class name of `classes`), else `none`.
    img2dataset's caption .txt is therefore never taken for a label."""
    if not samples:
        return LabelKey("none")
    if all("cls" in p for p in samples):  # .cls is a label member by convention, even if bad
        return LabelKey("cls")
    candidates = [LabelKey("json", f) for f in JSON_FIELDS] + [LabelKey("txt")]
    for cand in candidates:
        if _all_label(samples, cand, classes):
            return cand
    return LabelKey("none")


def first_samples(url: str, storage_options: dict | None = None, n: int = DETECT_SAMPLES,
                  max_member_bytes: int | None = None, *,
                  cache: ShardCache | None = None, count: Callable[[str, int], None] | None = None,
                  on_retry: Callable[[BaseException], None] | None = None,
                  ) -> list[tuple[str, dict[str, bytes]]]:
    """Up to `n` samples from the start of one shard (a short read; a broken tail is fine).
    `max_member_bytes`: tario's limit (None: its default). With `cache` the shard is read
    through the local shard cache (where the epoch finds it again), its counters going to
    `count`."""
    from sslstream.pipelines.shards.cache import open_shard
    from sslstream.pipelines.shards.tario import (
        DEFAULT_MAX_MEMBER_BYTES,
        ShardEnded,
        iter_tar_samples,
    )

    out: list[tuple[str, dict[str, bytes]]] = []
    with open_shard(url, storage_options, cache=cache, count=count, on_retry=on_retry) as f:
        try:
            for key, parts in iter_tar_samples(
                    f, max_member_bytes=max_member_bytes or DEFAULT_MAX_MEMBER_BYTES):
                out.append((key, parts))
                if len(out) >= n:
                    break
        except ShardEnded:
            pass
    return out


def describe_members(samples: Sequence[tuple[str, Mapping[str, bytes]]]) -> str:
    """'jpg, json{caption, url}, txt' -- what the samples hold (json: its fields)."""
    exts: dict[str, set[str]] = {}
    for _, parts in samples:
        for ext, raw in parts.items():
            fields = exts.setdefault(ext, set())
            if ext == "json":
                try:
                    doc = json.loads(raw)
                    if isinstance(doc, dict):
                        fields.update(map(str, doc))
                except ValueError:
                    pass
    return ", ".join(f"{e}{{{', '.join(sorted(f)[:8])}}}" if f else e
                     for e, f in sorted(exts.items())) or "(no members)"


def require_labels(split: str, spec: object, label_key: str | LabelKey = "auto", *,
                   storage_options: dict | None = None, n: int = DETECT_SAMPLES,
                   max_member_bytes: int | None = None) -> LabelKey:
    """Check, before training, that `split` (e.g. "data.test") yields labels; return the
    label key it will be read with. Reads the first `n` samples of its first shard
    (`max_member_bytes`: tario's limit, None: its default)."""
    from sslstream.pipelines.shards.manifest import resolve_shards

    refs, classes = resolve_shards(spec if isinstance(spec, str) else [str(s) for s in spec],  # type: ignore[union-attr]
                                   storage_options)
    samples = first_samples(refs[0].url, storage_options, n, max_member_bytes)
    key = parse_label_key(label_key)
    if key.kind == "auto":
        key = detect_label_key([p for _, p in samples], classes)
    parts = [p for _, p in samples]
    try:
        found = sum(read_label(p, key, classes) is not None for p in parts)
    except BadLabel as e:
        raise MissingLabels(f"{split}={spec}: label_key={key} reads a bad label in "
                            f"{refs[0].url}: {e}") from None
    if samples and found == len(parts):
        return key
    seen = describe_members(samples)
    why = ("no label member was recognised" if key.kind == "none"
           else f"label_key={key} gives a label to {found} of the first {len(parts)} samples")
    raise MissingLabels(
        f"{split}={spec} must be labelled (evaluation reads its labels), but {why} "
        f"(first shard {refs[0].url}; members seen: {seen}). Fix: set data.label_key to "
        "the member holding the class index (cls, json:<field>, txt), or point "
        f"{split} at labelled shards; for unlabelled data set data.test=null data.bank=null "
        "eval.at_end=false eval.every_epochs=0 (trains without evaluation; the encoder is "
        "registered unevaluated, never promoted: docs/data.md)")
