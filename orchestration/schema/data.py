"""The data's keys (``data.*``): where the shards are and how the stream reads them.

The presets (conf/data/synthetic.yaml, cifar10.yaml, shards.yaml) set what differs from
these defaults for their data; ``data=<preset>`` picks one, ``data.<key>=`` overrides a key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from sslstream.conf.typed import Check, ConfigValueError, Ge, Gt, Interval, MinLen, Typed
from sslstream.pipelines.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from sslstream.pipelines.shards.validate import DEFAULT_MAX_PIXELS

__all__ = ["DataConfig", "SourceConfig", "Sources", "label_key_ok"]

NonEmpty = Annotated[str, MinLen(1)]
# a shard folder / prefix, a manifest URL (URL#split), a brace pattern, or a list of them
Spec = NonEmpty | Annotated[list[NonEmpty], MinLen(1)]


@dataclass(frozen=True, kw_only=True)
class SourceConfig(Typed):
    """One source of a weighted mix in ``data.train`` (pipelines/shards/mix.py): its shards
    and how much of them every epoch takes: at most one of weight, samples, repeat (none:
    one pass). Either every source has a weight or none has."""

    config_key: ClassVar[str] = "data.train[]"
    url: Spec                            # the source's shards, as a plain data.train
    weight: Annotated[float, Gt(0)] | None = None  # share of every epoch's samples, relative to the others'
    samples: Annotated[int, Ge(1)] | None = None   # this many samples of the source every epoch
    repeat: Annotated[float, Ge(0)] | None = None  # passes over the source every epoch (0.5: half of it)


# plain shards (read once each, concatenated), or a list of sources (a weighted mix)
Sources = NonEmpty | Annotated[list[NonEmpty | SourceConfig], MinLen(1)]
WEIGHT_KEYS = ("weight", "samples", "repeat")


def check_sources(value: Any, key: str) -> None:
    """The rules between a mix's entries (one of weight / samples / repeat per source;
    weights on every source or on none), as ConfigValueErrors naming ``key[i].<field>``."""
    if isinstance(value, str) or not any(isinstance(v, SourceConfig) for v in value):
        return
    for i, src in enumerate(value):
        if isinstance(src, SourceConfig):
            given = [k for k in WEIGHT_KEYS if getattr(src, k) is not None]
            if len(given) > 1:
                raise ConfigValueError(
                    f"{key}[{i}].{given[1]}: {key}[{i}] sets {' and '.join(given)}, a source "
                    "takes one of weight (its share of the epoch), samples or repeat",
                    f"{key}[{i}].{given[1]}")
    weighted = [isinstance(v, SourceConfig) and v.weight is not None for v in value]
    if any(weighted) and not all(weighted):
        i = weighted.index(False)
        raise ConfigValueError(
            f"{key}[{i}].weight is not set while other sources of {key} have a weight: give "
            "every source a weight (shares of each epoch), or none (samples / repeat / one "
            "pass each)", f"{key}[{i}].weight")
_LABEL_KEY = re.compile(r"^(cls|txt|none|auto|json|json:\S+)$")


def label_key_ok(value: str) -> bool:
    """pipelines/shards/labels.py ``parse_label_key``'s forms."""
    return bool(_LABEL_KEY.match(value))


@dataclass(frozen=True, kw_only=True)
class DataConfig(Typed):
    """``data.*``: docs/data.md for the forms a split takes."""

    config_key: ClassVar[str] = "data"
    name: NonEmpty                       # the preset's name (run_name and tags use it)
    root: NonEmpty | None = None         # the preset's folder (train/test are under it)
    # the shards to train on; or a list of sources {url, weight | samples | repeat}: a
    # weighted mix (docs/data.md "Weighted mixes of sources")
    train: Sources
    test: Spec | None = None             # labelled split for kNN queries / linear-probe test
    # labelled split of the kNN memory bank / probe train set (a mix: every shard once)
    bank: Sources | None = "${.train}"
    generate: bool = False               # create the synthetic shards under root if missing
    generate_train_samples: Annotated[int, Ge(1)] = 2560
    generate_test_samples: Annotated[int, Ge(1)] = 512
    generate_seed: Annotated[int, Ge(0)] = 0  # the same seed gives the same images
    num_classes: Annotated[int, Ge(2)] | None = None  # null: from the manifest's classes
    image_size: Annotated[int, Ge(1)] = 224  # the images' side (32 px data: 32); views: augment.view*.size
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options (endpoint, profile, anon)
    shuffle_buffer: Annotated[int, Ge(0)] = 5000
    exact_epoch: bool = False            # pad by wrap-around so every sample is seen each epoch
    num_workers: Annotated[int, Ge(1)] = 4  # reader threads per rank (I/O bound: raise for object stores)
    max_bad_fraction: Annotated[float, Interval(ge=0, le=1)] = 0.01  # stop naming the shard past this corrupt fraction
    validate: Literal["header", "decode"] = "header"  # decode: full PIL decode (slower, catches broken entropy data)
    label_key: Annotated[str, Check(label_key_ok, "cls | json:<field> | txt | none | auto")] = "auto"
    image_keys: Annotated[list[NonEmpty], MinLen(1)] = field(
        default_factory=lambda: ["jpg", "jpeg", "png", "webp"])  # image member extensions, tried in order
    max_pixels: Annotated[int, Ge(1)] | None = DEFAULT_MAX_PIXELS  # skip images declaring more pixels; null: no limit
    # a tar member (and a sample's members together) past this ends its shard, counted
    # (docs/data.md "Limits on what a shard may hold"); checked before any of it is read
    max_member_bytes: Annotated[int, Ge(1024)] = DEFAULT_MAX_MEMBER_BYTES
    # local shard cache for object-store shards (s3://, gs://), shared by the node's ranks;
    # null: off (docs/data.md "Local shard cache")
    cache_dir: Annotated[str, MinLen(1)] | None = None
    # bytes the cache may hold (least recently used evicted); null: no limit but the disk;
    # at least the largest shard (checked against the manifests before training)
    cache_limit: Annotated[int, Ge(1)] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sources(self.train, "data.train")
