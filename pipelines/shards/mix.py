"""Weighted mixes of shard sets: how many samples each source gives an epoch, and which.

`data.train` may list *sources*, each a shard set (`url`: anything a plain `data.train`
takes: a folder, a manifest URL, a brace pattern, or a list of them) with at most one of

- `weight`: relative; the source's share of every epoch's samples. Weights are normalised
  over the sources, and the epoch holds as many samples as all sources together (MosaicML
  streaming's `proportion`, with its default `epoch_size`);
- `samples`: absolute; this many samples of the source every epoch;
- `repeat`: absolute; this many passes over the source every epoch (0.5: half of it);
- none of them: absolute, one pass (`repeat: 1`).

Relative and absolute sources do not combine (as in MosaicML's `Stream`): either every
source has a weight or none has. A list of plain URLs, or sources that all read their data
once, is not a mix: the stream reads the shards concatenated, exactly as before.

Which samples, shard by shard: a source giving n of its N samples an epoch contributes
floor(n / N) passes over all its shards, then whole shards in a (seed, epoch, source)
permutation until the count is reached, the last one in part (its first samples). An object
store is thus read in whole shards, plus at most one partial read per source, and the shards
taken change from epoch to epoch, so over epochs every shard is used alike.

How the mix is interleaved: the pieces of all sources go into one (seed, epoch) permutation,
laid end to end and cut into the ranks' slices (pipelines/shards/plan.py), and each rank's
shuffle buffer mixes what its lanes read. The per-epoch counts are exact (`quotas`); a rank,
or a stretch of the epoch, sees the proportions up to the sampling error of drawing whole
shards (tests/pipelines/test_mix.py measures it).
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.plan import Segment, mix_seed, shard_order

__all__ = ["Mix", "Source", "flat_urls", "parse_sources"]

WEIGHT_KEYS = ("weight", "samples", "repeat")


@dataclass(frozen=True)
class Source:
    """One entry of a mix: its shard URLs and how much of it an epoch takes."""

    urls: str | tuple[str, ...]
    weight: float | None = None
    samples: int | None = None
    repeat: float | None = None

    @property
    def label(self) -> str:
        return self.urls if isinstance(self.urls, str) else ",".join(self.urls)

    def signature(self) -> list[Any]:
        """What of the source decides the plan besides its shards (for cursors)."""
        return [self.weight, self.samples, self.repeat]


def _is_source(item: Any) -> bool:
    return isinstance(item, Mapping)


def parse_sources(spec: str | Sequence[Any]) -> list[Source] | None:
    """The sources of a `data.train` value, or None for a plain one (a URL or a list of
    URLs: the shards concatenated). Raises DataError naming a malformed entry (the config
    schema, orchestration/schema/data.py, refuses these before anything runs)."""
    if isinstance(spec, str) or not any(_is_source(x) for x in spec):
        return None
    out = []
    for i, item in enumerate(spec):
        if not _is_source(item):
            item = {"url": item}
        unknown = sorted(set(item) - {"url", *WEIGHT_KEYS})
        if unknown:
            raise DataError(f"source {i} of the mix has unknown key(s) {unknown}: a source "
                            "is {url, weight | samples | repeat}")
        url = item.get("url")
        urls = url if isinstance(url, str) else tuple(str(u) for u in (url or ()))
        if not urls:
            raise DataError(f"source {i} of the mix has no url")
        given = [k for k in WEIGHT_KEYS if item.get(k) is not None]
        if len(given) > 1:
            raise DataError(f"source {i} ({_label(urls)}) sets {' and '.join(given)}: a source "
                            "takes one of weight, samples, repeat")
        src = Source(urls, *(_number(item, k, i) for k in WEIGHT_KEYS))
        out.append(src)
    weighted = [s.weight is not None for s in out]
    if any(weighted) and not all(weighted):
        first = weighted.index(False)
        raise DataError(f"source {first} ({out[first].label}) has no weight while others do: "
                        "either every source has a weight (shares of the epoch) or none has "
                        "(samples / repeat / one pass)")
    return out


def _label(urls: str | Sequence[str]) -> str:
    return urls if isinstance(urls, str) else ",".join(urls)


def _number(item: Mapping[str, Any], key: str, i: int) -> float | int | None:
    v = item.get(key)
    if v is None:
        return None
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if key == "samples":
        ok = ok and float(v).is_integer() and v >= 1
    elif key == "repeat":
        ok = ok and v >= 0
    else:
        ok = ok and v > 0
    if not ok:
        want = {"weight": "a positive finite number", "samples": "a whole number >= 1",
                "repeat": "a finite number >= 0"}[key]
        raise DataError(f"source {i} ({_label(item.get('url') or '')}) {key}={v!r}: expected "
                        f"{want}")
    return int(v) if key == "samples" else float(v)


def flat_urls(spec: str | Sequence[Any]) -> str | list[str]:
    """Every source's URLs as one plain spec (each shard once): what an evaluation split
    that defaults to `data.train` reads, and what a plain consumer of the spec takes."""
    if isinstance(spec, str):
        return spec
    out: list[str] = []
    for item in spec:
        url = item.get("url") if _is_source(item) else item
        out.extend([url] if isinstance(url, str) else [str(u) for u in url or ()])
    return out


def is_plain(sources: Sequence[Source]) -> bool:
    """Every source read once: the concatenation, no mix."""
    return all(s.weight is None and s.samples is None and s.repeat in (None, 1.0)
               for s in sources)


@dataclass(frozen=True)
class Mix:
    """`sources` over a stream's shard list: source i owns shards [spans[i][0], spans[i][1])."""

    sources: tuple[Source, ...]
    spans: tuple[tuple[int, int], ...]

    def sizes(self, counts: Sequence[int]) -> list[int]:
        return [sum(counts[a:b]) for a, b in self.spans]

    def quotas(self, counts: Sequence[int]) -> list[int]:
        """Samples each source gives every epoch (they add up to the epoch's size)."""
        sizes = self.sizes(counts)
        if self.sources[0].weight is not None:
            weights = [float(s.weight or 0) for s in self.sources]
            return _apportion(sum(sizes), weights)
        out = []
        for s, n in zip(self.sources, sizes, strict=True):
            if s.samples is not None:
                out.append(int(s.samples))
            else:
                out.append(int(round((1.0 if s.repeat is None else s.repeat) * n)))
        return out

    def pieces(self, counts: Sequence[int], seed: int, epoch: int, shuffle: bool) -> list[Segment]:
        """The epoch's pieces: each source's share (full passes, whole shards, one partial
        shard), all sources' pieces in one (seed, epoch) permutation."""
        out: list[Segment] = []
        for i, ((a, b), want) in enumerate(zip(self.spans, self.quotas(counts), strict=True)):
            out.extend(_take(counts, a, b, want, mix_seed(seed, epoch, i, 0x50C)))
        order = shard_order(len(out), seed, epoch, shuffle)
        return [out[j] for j in order]


    def source_of(self, shard: int) -> int:
        """The source that shard number `shard` belongs to."""
        return bisect.bisect_right([a for a, _ in self.spans], shard) - 1

    def realised(self, pieces: Sequence[Segment], positions: int) -> list[int]:
        """Samples of each source among the first `positions` positions of the epoch's
        global order `pieces` (past its end the order wraps around: exact_epoch's padding;
        fewer positions: the tail dropped without it)."""
        out = [0] * len(self.sources)
        total = sum(len(p) for p in pieces)
        if total == 0:
            return out
        passes, rest = divmod(positions, total)
        for p in pieces:
            n = len(p)
            out[self.source_of(p.shard)] += passes * n + min(n, max(0, rest))
            rest -= n
        return out


def _apportion(total: int, weights: Sequence[float]) -> list[int]:
    """`total` split in proportion to `weights`, largest remainders first (sums to total)."""
    w = sum(weights)
    exact = [total * x / w for x in weights]
    out = [math.floor(e) for e in exact]
    for i in sorted(range(len(exact)), key=lambda i: (out[i] - exact[i], i))[: total - sum(out)]:
        out[i] += 1
    return out


def _take(counts: Sequence[int], a: int, b: int, want: int, seed: int) -> list[Segment]:
    """`want` samples of shards [a, b): full passes, then whole shards in a seeded order,
    the last one cut short."""
    size = sum(counts[a:b])
    if want <= 0 or size == 0:
        return []
    full, rest = divmod(want, size)
    whole = [Segment(s, 0, counts[s]) for s in range(a, b) if counts[s]]
    out = whole * full
    order = list(range(a, b))
    random.Random(seed).shuffle(order)
    for s in order:
        if rest <= 0:
            break
        take = min(counts[s], rest)
        if take:
            out.append(Segment(s, 0, take))
            rest -= take
    return out
