"""ShardStream: a resumable, rank-balanced stream of encoded samples from tar shards.

What it guarantees (docs/data.md has the long form):
- every rank yields exactly `len(stream)` samples per epoch, whatever the shard sizes and
  however many corrupt samples it meets (shortfalls are topped up by wrap-around over
  the rank's own slice, counted);
- with `exact_epoch=True` every sample is in exactly one rank's slice each epoch (the
  last W*L - N positions are padding that wraps around, counted);
- the order is a pure function of (data, seed, epoch, rank, world_size, num_workers), so
  `load_state_dict` resumes mid-epoch exactly: the cursor logs the bad samples met, the
  epoch is fast-forwarded on indices (pipelines/shards/resume.py) and only the shuffle buffer's
  samples and the lanes' current shards are read again. A cursor without that log falls
  back to replaying the epoch's reads up to the cursor;
- the epoch's global order does not depend on world_size, so a stop at W ranks continues
  the same epoch on W' ranks: every rank loads the same request built from all W cursors
  (pipelines/shards/elastic.py) and reads its share of what they left;
- `urls` may be a weighted mix of sources (pipelines/shards/mix.py): each epoch takes each
  source's share, shard by shard, and interleaves them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import threading
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import TYPE_CHECKING

from sslstream.pipelines.shards.cache import Expected, ShardCache, is_remote, too_big_for
from sslstream.pipelines.shards.elastic import OldRank, Reshard, remainder
from sslstream.pipelines.shards.errors import DataError
from sslstream.pipelines.shards.labels import (
    DEFAULT_IMAGE_KEYS,
    detect_label_key,
    first_samples,
    parse_label_key,
)
from sslstream.pipelines.shards.manifest import ShardRef, count_samples, resolve_shards
from sslstream.pipelines.shards.masking import mask
from sslstream.pipelines.shards.mix import Mix, flat_urls, is_plain, parse_sources
from sslstream.pipelines.shards.parallel import run_each
from sslstream.pipelines.shards.plan import (
    Segment,
    layout,
    mix_seed,
    partition_bounds,
    partition_segments,
    per_rank,
    pieces_of,
    shard_order,
    window,
)
from sslstream.pipelines.shards.reader import (
    Bad,
    Good,
    LanePositions,
    LaneReader,
    SampleSpec,
    Short,
)
from sslstream.pipelines.shards.resume import EpochLog, FastForward, fast_forward, fetch
from sslstream.pipelines.shards.sample import (
    BAD_REASONS,
    COUNTER_NAMES,
    BadDataError,
    Sample,
    sample_options,
)
from sslstream.pipelines.shards.storage import StorageError, plain
from sslstream.pipelines.shards.tario import DEFAULT_MAX_MEMBER_BYTES
from sslstream.pipelines.shards.validate import DEFAULT_MAX_PIXELS, VALIDATE_MODES

if TYPE_CHECKING:
    from sslstream.pipelines.shards.lanes import LaneHandle

log_ = logging.getLogger(__name__)

__all__ = ["BadDataError", "Sample", "ShardStream", "sample_options"]


class ShardStream:
    """See the module docstring; arguments as in docs/contracts.md."""

    def __init__(self, urls: str | Sequence[str | dict], *, rank: int = 0, world_size: int = 1,
                 num_workers: int = 2, seed: int = 0, shuffle: bool = True,
                 shuffle_buffer: int = 1000, exact_epoch: bool = False,
                 storage_options: dict | None = None, max_bad_fraction: float = 0.01,
                 validate: str = "header", num_classes: int | None = None,
                 label_key: str = "auto", image_keys: Sequence[str] | None = None,
                 max_pixels: int | None = DEFAULT_MAX_PIXELS, require_label: bool = False,
                 partition: bool = False, cache_dir: str | None = None,
                 cache_limit: int | None = None,
                 max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} outside world_size={world_size}")
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate={validate!r}: expected one of {VALIDATE_MODES}")
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction={max_bad_fraction}: expected 0..1")
        urls = plain(urls) if not isinstance(urls, str) else urls  # ListConfig from Hydra
        self.urls_spec = urls
        self.rank, self.world_size = rank, world_size
        self.num_workers, self.seed, self.shuffle = int(num_workers), int(seed), bool(shuffle)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.exact_epoch, self.max_bad_fraction = bool(exact_epoch), float(max_bad_fraction)
        self.storage_options = plain(storage_options) if storage_options else None
        self.validate = validate
        # partition: ranks read disjoint contiguous shares of the listed order that together
        # hold every sample once (sizes differ by <= 1; evaluation), instead of equal lengths
        if partition and shuffle:
            raise ValueError("partition=True reads the shards in their listed order: shuffle=False")
        self.partition = bool(partition)
        refs, classes, self.mix = self._resolve(urls)
        self.classes = classes
        self.num_classes = num_classes if num_classes is not None else (len(classes) if classes else None)
        self._refs: list[ShardRef] = refs
        self.cache = self._make_cache(cache_dir, cache_limit)
        self._counts: list[int] | None = None
        self._fp: dict[tuple[int, int], str] = {}  # cursor fingerprints per (rank, world_size)
        self._data_fp: str | None = None
        self._reshard: Reshard | None = None  # the epoch continued from another run's ranks
        self._plans: dict[tuple, tuple[list[Segment], int, int]] = {}
        self._log: EpochLog | None = EpochLog()  # bad samples met this epoch (for the cursor)
        self.epoch, self.position = 0, 0
        self._counters: Counter[str] = Counter({k: 0 for k in COUNTER_NAMES})
        self._lock = threading.Lock()
        self._label_key = parse_label_key(label_key)
        self.image_keys = tuple(str(k).lower().lstrip(".") for k in (image_keys or DEFAULT_IMAGE_KEYS))
        self.max_pixels = int(max_pixels) if max_pixels else None
        if int(max_member_bytes) < 1:
            raise ValueError(f"max_member_bytes={max_member_bytes}: expected a positive size")
        self.max_member_bytes = int(max_member_bytes)
        self.require_label = bool(require_label)
        self._spec: SampleSpec | None = None
        # bad samples of this epoch: met by the reader / reported by a consumer (the loader's
        # decoder) / met by this stream's copy in a reader process (`set_external_bad`); all
        # count toward max_bad_fraction
        self._stream_bad = self._late_bad = self._external_bad = 0
        # set in a reader process (pipelines/views/workers.py): run the lanes in processes
        self.lane_pool: LaneHandle | None = None
        log_.debug("ShardStream over %d shards, storage_options=%s", len(refs),
                   mask(storage_options or {}, options=True))

    def __getstate__(self) -> dict:
        """Picklable (spawned loader workers): the lock is recreated on the other side."""
        d = dict(self.__dict__)
        d.pop("_lock", None)
        d["lane_pool"] = None  # a reader process's handle on its lane processes stays there
        # the copy counts only what it meets itself: the trainer adds the two (loader.counters)
        d["_counters"] = Counter({k: 0 for k in COUNTER_NAMES})
        d["_late_bad"] = d["_external_bad"] = 0
        return d

    def __setstate__(self, d: dict) -> None:
        self.__dict__.update(d)
        self._lock = threading.Lock()

    def _resolve(self, spec: str | Sequence[str | dict]
                 ) -> tuple[list[ShardRef], list[str] | None, Mix | None]:
        """The shards of `spec` and its mix (None: the shards concatenated, read once each).
        An evaluation split (partition) reads every source's shards once, unweighted."""
        sources = parse_sources(spec) if not isinstance(spec, str) else None
        if sources is None or self.partition:
            return (*resolve_shards(flat_urls(spec), self.storage_options), None)
        refs: list[ShardRef] = []
        spans: list[tuple[int, int]] = []
        classes: list[str] | None = None
        for i, src in enumerate(sources):
            try:
                got, c = resolve_shards(src.urls, self.storage_options)
            except StorageError as e:  # missing, refused, unreachable: named with its source
                raise type(e)(f"source {i} of the mix ({mask(src.label)}): {e}", e.url) from None
            except DataError as e:
                raise type(e)(f"source {i} of the mix ({mask(src.label)}): {e}", *e.args[1:]) from None
            spans.append((len(refs), len(refs) + len(got)))
            refs.extend(got)
            classes = classes or c
        mix = None if is_plain(sources) else Mix(tuple(sources), tuple(spans))
        return refs, classes, mix

    def _make_cache(self, directory: str | None, limit: int | None) -> ShardCache | None:
        """The local shard cache (pipelines/shards/cache.py) when a folder is given and some
        shards are in an object store; the order of samples is the same without it."""
        remote = [r for r in self._refs if is_remote(r.url)]
        if not directory or not remote:
            return None
        if big := too_big_for(limit, [(r.url, r.bytes) for r in remote]):
            # `sslstream train` refuses this config before reading data (train/job.py)
            log_.warning("cache_limit=%d is smaller than the shard %s (%d bytes): shards "
                         "larger than the limit are read from the store every time", limit,
                         *big)
        return ShardCache(directory, limit, storage_options=self.storage_options,
                          expected={r.url: Expected(r.bytes, r.sha256) for r in remote})

    # ------------------------------------------------------------------ sizes

    @property
    def shard_urls(self) -> list[str]:
        return [r.url for r in self._refs]

    @property
    def shard_counts(self) -> list[int]:
        """Samples per shard: from the manifest, else one counting read (cached per process)."""
        if self._counts is None:
            missing = [r.url for r in self._refs if r.samples is None]
            if missing:
                log_.warning("no manifest counts for %d shards: counting them (one full read)", len(missing))
                counted = run_each(lambda u, stop: count_samples(
                    u, self.storage_options, max_member_bytes=self.max_member_bytes, stop=stop),
                    missing, workers=self.num_workers, name="sslstream-count")
                found = dict(zip(missing, counted, strict=True))
            self._counts = [r.samples if r.samples is not None else found[r.url] for r in self._refs]
            if sum(self._counts) == 0:
                raise DataError(f"no samples in the shards of {self.urls_spec!r}")
            if self.mix is not None:
                for i, n in enumerate(self.mix.sizes(self._counts)):
                    if n == 0:
                        raise DataError(f"source {i} of the mix ({mask(self.mix.sources[i].label)}) "
                                        "holds no samples")
        return self._counts

    @property
    def num_samples(self) -> int:
        """Samples in the data set (all ranks), as listed."""
        return sum(self.shard_counts)

    @property
    def epoch_samples(self) -> int:
        """Samples of one epoch over all ranks (before padding or dropping): the data set,
        or the sum of the mix's per-source quotas."""
        return sum(self.source_quotas) if self.mix is not None else self.num_samples

    @property
    def source_quotas(self) -> list[int]:
        """Samples each source gives every epoch (one entry, the data set, without a mix)."""
        return self.mix.quotas(self.shard_counts) if self.mix is not None else [self.num_samples]

    def source_counts(self, epoch: int) -> list[int]:
        """Samples each source gives `epoch` over all ranks (padding and a dropped tail
        included; one entry without a mix): what the trainer logs per epoch."""
        positions = self.world_size * self._length(self.world_size)
        if self.mix is None:
            return [positions]
        return self.mix.realised(self.pieces(epoch), positions)

    def __len__(self) -> int:
        if self.partition:
            lo, hi = partition_bounds(self.num_samples, self.rank, self.world_size)
            return hi - lo
        return self._length(self.world_size)

    def _length(self, world_size: int) -> int:
        n = per_rank(self.epoch_samples, world_size, self.exact_epoch)
        if n == 0:
            raise DataError(f"{self.epoch_samples} samples cannot fill {world_size} ranks "
                            "without exact_epoch=True")
        return n

    def pieces(self, epoch: int) -> list[Segment]:
        """The epoch's pieces in their global order (plan.py): whole shards in a (seed,
        epoch) permutation, or the mix's choice of them."""
        if self.mix is not None:
            return self.mix.pieces(self.shard_counts, self.seed, epoch, self.shuffle)
        order = shard_order(len(self._refs), self.seed, epoch, self.shuffle)
        return pieces_of(self.shard_counts, order)

    def segments(self, epoch: int | None = None) -> list[Segment]:
        """This rank's reading plan for `epoch` (default: the current one)."""
        return self._plan(self.epoch if epoch is None else epoch)[0]

    def _plan(self, epoch: int) -> tuple[list[Segment], int, int]:
        """(segments, samples they yield, position they start at) of this rank in `epoch`."""
        if self.partition:
            return partition_segments(self.shard_counts, self.rank, self.world_size), len(self), 0
        rs = self._reshard if self._reshard is not None and self._reshard.epoch == epoch else None
        return self._plan_for(epoch, self.rank, self.world_size, rs)

    def _plan_for(self, epoch: int, rank: int, world_size: int, rs: Reshard | None
                  ) -> tuple[list[Segment], int, int]:
        """The plan of rank `rank` of `world_size` in `epoch`, continued from `rs` if given."""
        key = (epoch, rank, world_size, rs.token if rs else None)
        if key not in self._plans:
            if len(self._plans) > 64:
                self._plans.clear()
            full = self._length(world_size)
            if rs is None:
                plan = (layout(self.pieces(epoch), rank, full), full, 0)
            else:
                length = max(0, full - rs.base)
                if rs.left:
                    segs = layout(rs.pieces, rank, length)
                else:  # nothing left at all: padding from the whole epoch
                    segs = [s.part(0, len(s), True) for s in layout(self.pieces(epoch), rank, length)]
                plan = (segs, length, rs.base)
            self._plans[key] = plan
        return self._plans[key]

    # ------------------------------------------------------------------ cursor

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a restored cursor of the same epoch keeps its position."""
        if int(epoch) != self.epoch:
            self.epoch, self.position, self._log = int(epoch), 0, EpochLog()
            self._late_bad = self._external_bad = 0
            self._reshard = None

    # ------------------------------------------------------------------ samples

    @property
    def spec(self) -> SampleSpec:
        """How samples are read; `label_key=auto` is resolved here, once, from the first
        samples of the first shard (pipelines/shards/labels.py)."""
        if self._spec is None:
            key = self._label_key
            if key.kind == "auto":
                first = first_samples(self._refs[0].url, self.storage_options,
                                      max_member_bytes=self.max_member_bytes,
                                      cache=self.cache, count=self._count,
                                      on_retry=lambda e: self._count("retries", 1))
                key = detect_label_key([p for _, p in first], self.classes)
                log_.info("label_key=auto: %s (from the first %d samples of %s)", key,
                          len(first), self._refs[0].url)
            self._spec = SampleSpec(self.image_keys, key,
                                    tuple(self.classes) if self.classes else None,
                                    self.require_label, self.max_pixels, self.max_member_bytes)
        return self._spec

    @property
    def label_key(self) -> str:
        return str(self.spec.label_key)

    @property
    def epoch_bad(self) -> int:
        """Bad samples of this epoch that this object knows of (read, reported, external)."""
        with self._lock:
            return self._stream_bad + self._late_bad + self._external_bad

    def count_bad(self, reason: str, shard: str, n: int = 1) -> None:
        """`n` samples a consumer found unusable after the stream yielded them (the loader's
        decoder failed on them): counted under `reason` and toward max_bad_fraction like
        those the reader skipped; raises BadDataError past the limit."""
        with self._lock:
            self._counters["skipped_corrupt"] += n
            self._counters[reason] += n
            self._late_bad += n
        self._check_limit(shard, lambda: f"{self._late_bad} undecodable after the header "
                                         f"check, last: {reason}")

    def set_external_bad(self, n: int, shard: str) -> None:
        """This epoch's bad samples as counted by this stream's copy in a reader process
        (pipelines/views/workers.py): the trainer's copy adds its own decoder rejections and
        checks the sum, which neither process sees alone; raises BadDataError past the limit.
        Called once per batch: a count that did not change costs one comparison."""
        if int(n) == self._external_bad:
            return
        with self._lock:
            self._external_bad = int(n)
        self._check_limit(shard, lambda: f"{int(n)} skipped in the reader process, "
                                         f"{self._late_bad} undecodable in the trainer")

    def _check_limit(self, shard: str, detail: Callable[[], str]) -> None:
        total, length = self.epoch_bad, len(self)
        if total > self.max_bad_fraction * length:
            raise BadDataError(
                f"{total} of this rank's {length} samples are corrupt or missing ({detail()}), "
                f"more than max_bad_fraction={self.max_bad_fraction}; limit passed in shard "
                f"{shard}", shard)

    def _fingerprint(self, rank: int | None = None, world_size: int | None = None) -> str:
        """What a cursor must match: the data, the order's parameters, rank and world size."""
        r = self.rank if rank is None else rank
        w = self.world_size if world_size is None else world_size
        if (r, w) not in self._fp:
            plan = [*self._order_plan(), r, w, max(1, self.num_workers), self.shuffle_buffer,
                    self.validate] + (["partition"] if self.partition else [])
            self._fp[(r, w)] = _digest(plan)
        return self._fp[(r, w)]

    def _data_fingerprint(self) -> str:
        """The part of the fingerprint that fixes the epoch's global order (not rank, world
        size, lanes, buffer or checks): what a cursor of another world size must match."""
        if self._data_fp is None:
            self._data_fp = _digest(self._order_plan())
        return self._data_fp

    def _order_plan(self) -> list:
        """What fixes an epoch's global sample order: the shards, their sizes, the seed, the
        shuffle, exactness and the mix."""
        plan: list = [self.shard_urls, self.shard_counts, self.seed, self.shuffle, self.exact_epoch]
        if self.mix is not None:
            plan.append(["mix", [s.signature() for s in self.mix.sources],
                         [list(sp) for sp in self.mix.spans]])
        return plan

    def state_dict(self, position: int | None = None) -> dict:
        """The cursor (plain Python types). A consumer that prefetches passes the number of
        samples it has really consumed this epoch as `position`. `log` lists the bad samples
        met so far this epoch, which lets a resume skip re-reading the epoch; `plan`,
        `lanes` and `shuffle_buffer` let the ranks of a run on another number of ranks
        replay it (pipelines/shards/elastic.py); `origin`, in an epoch continued from
        another run's ranks, is where it came from."""
        pos = self.position if position is None else int(position)
        st = {"version": 2, "epoch": self.epoch, "position": pos, "seed": self.seed,
              "rank": self.rank, "world_size": self.world_size,
              "fingerprint": self._fingerprint()}
        if not self.partition:
            st.update(plan=self._data_fingerprint(), lanes=max(1, self.num_workers),
                      shuffle_buffer=self.shuffle_buffer)
        if self._log is not None:
            st["log"] = self._log.to_state()
        if self._reshard is not None and self._reshard.epoch == self.epoch:
            st["origin"] = self._reshard.origin
        return st

    def load_state_dict(self, state: dict) -> None:
        """Restore a cursor of this stream, or continue an epoch from the cursors of a run
        on another number of ranks (a request of `elastic.request`: no rank of its own)."""
        if "origin" in state and "rank" not in state:
            self._reshard = self._continue(int(state["epoch"]), state["origin"])
            self.epoch, self.position = self._reshard.epoch, self._reshard.base
            self._log = EpochLog()
            self._late_bad = self._external_bad = 0
            return
        fp = self._fingerprint()
        if state.get("fingerprint") not in (None, fp):
            raise DataError(
                "stream cursor does not match this stream (shards, counts, seed, shuffle, "
                f"exact_epoch, rank/world_size {self.rank}/{self.world_size}, num_workers, "
                f"shuffle_buffer or validate changed): saved {state.get('fingerprint')}, now {fp}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._reshard = self._continue(self.epoch, state["origin"]) if "origin" in state else None
        # Without a log (older cursor) the epoch is replayed by reading it again.
        self._log = EpochLog.from_state(state["log"]) if "log" in state else None

    def _continue(self, epoch: int, origin: dict) -> Reshard:
        """`epoch` continued after the stop that `origin` describes (its ranks' cursors):
        what they left, for this run's ranks (pipelines/shards/elastic.py)."""
        if self.partition:
            raise DataError("an evaluation split (partition=True) is never continued")
        cursors = list(origin["cursors"])
        world = len(cursors)
        # a cursor saved before its rank read anything is the request it loaded
        nested = next((c["origin"] for c in cursors if "origin" in c), None)
        before = self._continue(epoch, nested) if nested is not None else None
        olds = []
        for r, c in enumerate(cursors):
            if int(c["epoch"]) != epoch:
                raise DataError(f"cannot continue epoch {epoch}: rank {r}'s cursor is in epoch "
                                f"{c['epoch']}")
            segs, length, base = self._plan_for(epoch, r, world, before)
            if "rank" in c:
                self._check_foreign(c, r, world)
            log = EpochLog.from_state(c.get("log") or {})
            lanes = int(c.get("lanes", max(1, self.num_workers)))
            buffer = max(1, int(c.get("shuffle_buffer", self.shuffle_buffer)))
            shuffled = self.shuffle and buffer > 1
            seed = mix_seed(self.seed, epoch, r, 0xB0FF) if shuffled else None
            olds.append(OldRank(segs, length, int(c["position"]) - base, log, lanes, buffer, seed))
        # the epoch's tail that no old rank's slice held (exact_epoch=false drops fewer
        # than `world` samples): it was never read, so it is part of what is left
        laid_out = tuple(before.pieces) if before is not None else tuple(self.pieces(epoch))
        held, whole = world * olds[0].length, sum(len(p) for p in laid_out)
        tail = window(laid_out, held, whole) if held < whole else []
        pieces = tuple(remainder(olds)) + tuple(tail)
        left = sum(len(p) for p in pieces)
        token = hashlib.sha256(json.dumps(origin, sort_keys=True).encode()).hexdigest()
        rs = Reshard(epoch, int(origin["base"]), pieces, origin, left, token)
        if self.rank == 0:
            need = self.world_size * max(0, self._length(self.world_size) - rs.base)
            how = (f"{need - left} padded" if need > left else
                   f"{left - need} left out" if left > need else "none padded or left out")
            log_.info("epoch %d continues on %d rank(s) from %d: %d samples left, %d per rank "
                      "(%s)", epoch, self.world_size, world, left, need // self.world_size, how)
        return rs

    def _check_foreign(self, c: dict, rank: int, world: int) -> None:
        """A cursor of rank `rank` of `world` must come from a stream over the same data in
        the same order (its lanes and buffer may differ: they are replayed as they were)."""
        if "plan" in c:
            ok, now = c["plan"] == self._data_fingerprint(), self._data_fingerprint()
        else:  # written before cursors carried `plan`: lanes and buffer must match too
            ok, now = c.get("fingerprint") == self._fingerprint(rank, world), "-"
        if not ok or "log" not in c:
            why = "it has no bad-sample log" if ok else (
                "the shards, counts, seed, shuffle, exact_epoch or mix changed")
            raise DataError(f"cannot continue the epoch from rank {rank} of {world}'s cursor: "
                            f"{why} (saved {c.get('plan', c.get('fingerprint'))}, now {now})")

    @property
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self._counters[name] += n

    # ------------------------------------------------------------------ iteration

    def _reader(self, segments: Sequence[Segment], lanes: int | None = None,
                start: LanePositions | None = None) -> LaneReader:
        return LaneReader(self.shard_urls, segments,
                          lanes=self.num_workers if lanes is None else lanes,
                          storage_options=self.storage_options, num_classes=self.num_classes,
                          validate=self.validate, count=self._count, start=start,
                          spec=self.spec, cache=self.cache,
                          pool=self.lane_pool if lanes is None else None)

    def _valid(self, length: int, ff: FastForward | None = None) -> Iterator[Good]:
        """Exactly `length` good samples: the rank's slice, then top-ups by wrap-around.
        `ff` continues from a fast-forwarded state instead of the start of the epoch."""
        segs = self.segments()
        log = self._log if self._log is not None else EpochLog()
        limit = self.max_bad_fraction * len(self)
        n, bad = (ff.n_good, ff.bad) if ff else (0, 0)
        self._stream_bad = bad
        per_shard: Counter[str] = Counter()
        if ff is None or ff.phase == "main":
            for item in self._reader(segs, start=ff.lanes if ff else None):
                if isinstance(item, Good):
                    n += 1
                    yield item
                    continue
                if isinstance(item, Bad):
                    log.bad.add((item.seg, item.index))
                    self._count("skipped_corrupt")
                    self._count(item.reason)
                    log_.debug("skipped %s in %s: %s", item.key, item.shard, item.detail)
                    lost = 1
                else:
                    assert isinstance(item, Short)
                    log.got[item.seg] = item.got
                    self._count("truncated_shards")
                    self._count("lost", item.lost)
                    log_.warning("shard %s ended early, %d samples lost: %s", item.shard, item.lost, item.reason)
                    lost = item.lost
                bad += lost
                self._stream_bad = bad
                per_shard[item.shard] += lost
                if (total := self.epoch_bad) > limit:  # the same sum as _check_limit
                    worst = ", ".join(f"{u} ({c})" for u, c in per_shard.most_common(3))
                    why = ", ".join(f"{k} {v}" for k in BAD_REASONS if (v := self.counters[k]))
                    raise BadDataError(
                        f"{total} of this rank's {len(self)} samples are corrupt or missing ({why}), more "
                        f"than max_bad_fraction={self.max_bad_fraction}; limit passed in shard "
                        f"{item.shard} (worst: {worst}). `sslstream shards verify` names the "
                        "cause per shard (e.g. a tar whose members are not grouped by key)",
                        item.shard)
        if self.partition:  # each sample once: a corrupt one is missing, not replaced
            return
        resume_at = ff.topup if ff is not None and ff.phase == "topup" else None
        passes = resume_at[0] - 1 if resume_at else 0
        while n < length:  # top up by wrap-around over this rank's own slice
            passes += 1
            start = LanePositions({0: resume_at[1:]}, [0]) if resume_at else None
            partial, resume_at = resume_at is not None, None
            got = 0
            # Inline (no read-ahead threads): a top-up usually needs a handful of samples.
            for item in self._reader(segs, lanes=0, start=start):
                if isinstance(item, Good):
                    if n >= length:
                        break
                    n += 1
                    got += 1
                    self._count("topped_up")
                    yield item
            if got == 0 and not partial:
                raise BadDataError(f"rank {self.rank} found no readable sample in its slice "
                                   f"(pass {passes}, shards {sorted({self.shard_urls[s.shard] for s in segs})})",
                                   self.shard_urls[segs[0].shard])

    def _shuffled(self, items: Iterator[Good], ff: FastForward | None = None,
                  buffer: list[Good] | None = None) -> Iterator[Good]:
        if not self.shuffle or self.shuffle_buffer <= 1:
            yield from items
            return
        rng = random.Random(self._shuffle_seed())
        buf: list[Good] = []
        if ff is not None:
            rng.setstate(ff.rng_state)  # type: ignore[arg-type]
            buf = list(buffer or [])
            if ff.draining:
                yield from buf
                return
        for it in items:
            if len(buf) < self.shuffle_buffer:
                buf.append(it)
                continue
            j = rng.randrange(len(buf))
            out, buf[j] = buf[j], it
            yield out
        rng.shuffle(buf)
        yield from buf

    def _shuffle_seed(self) -> int:
        return mix_seed(self.seed, self.epoch, self.rank, 0xB0FF)

    def _fast_forward(self, length: int, position: int) -> tuple[FastForward, list[Good]]:
        """The plan's state after `position` of its `length` samples, computed from the log;
        reads only the shuffle buffer's samples (the lanes re-read their current shards up
        to where they were)."""
        assert self._log is not None
        segs = self.segments()
        shuffled = self.shuffle and self.shuffle_buffer > 1
        ff = fast_forward(segs, max(1, self.num_workers), self._log, length, position,
                          self.shuffle_buffer, self._shuffle_seed() if shuffled else None)
        buffer = fetch(ff.buffer, segs, self.shard_urls, storage_options=self.storage_options,
                       num_classes=self.num_classes, validate=self.validate, count=self._count,
                       workers=max(1, self.num_workers), spec=self.spec, cache=self.cache)
        return ff, buffer

    def __iter__(self) -> Generator[Sample, None, None]:
        """One epoch (the current one) for this rank, from the cursor on."""
        # the last pass finished (or a partition, which never resumes): the same epoch again,
        # whole (an epoch continued from another run's ranks is read whole the second time)
        if self.position >= len(self) or self.partition:
            self.position, self._reshard = 0, None
        segs, length, base = self._plan(self.epoch)
        if self.position == base:
            self._log = EpochLog()
            self._late_bad = 0
        done = skip = self.position - base  # samples of this rank's plan already yielded
        if skip and self._log is not None:  # fast-forward: no re-reading of the epoch
            ff, buffer = self._fast_forward(length, skip)
            items = self._shuffled(self._valid(length, ff), ff, buffer)
            self._count("fast_forwarded", skip)
        else:  # replay: read the epoch again up to the cursor, yielding nothing
            self._log = EpochLog()
            items = self._shuffled(self._valid(length))
            done = 0
        starts, pos = [], 0
        for n in self.shard_counts:
            starts.append(pos)
            pos += n
        for g in items:
            done += 1
            if done <= skip:
                self._count("replayed")
                continue
            self.position = base + done
            self._count("yielded")
            if g.padded:
                self._count("padded")
            index = starts[segs[g.seg].shard] + g.index if g.seg >= 0 and g.index >= 0 else -1
            yield Sample(g.key, g.image, g.label, g.shard, index)


def _digest(plan: list) -> str:
    return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]
