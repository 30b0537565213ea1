"""Fast-forward to a cursor: recompute an epoch's state without re-reading the epoch.

Why: the stream's order is a pure function of the plan and of *which* samples were bad.
The cursor carries the bad samples met so far ((segment, index) pairs, and how far each
cut-short segment got), so the lane merge, the top-up passes and the shuffle buffer can be
replayed on indices alone, in memory, in about a microsecond per sample. What must still
be read is only what the state holds: the shuffle buffer's samples (recent ones, from a
few shards) and the lanes' current shards up to where they stopped.

The simulation mirrors `reader.LaneReader._merge`, `stream.ShardStream._valid` and
`stream.ShardStream._shuffled` step for step; the resume tests compare the result with an
uninterrupted stream.
"""

from __future__ import annotations

import collections
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from sslstream.pipelines.shards.cache import ShardCache, open_shard
from sslstream.pipelines.shards.parallel import run_each
from sslstream.pipelines.shards.plan import Segment
from sslstream.pipelines.shards.reader import (
    DEFAULT_SPEC,
    Good,
    LanePositions,
    SampleSpec,
    check_sample,
)
from sslstream.pipelines.shards.tario import ShardEnded, iter_tar_samples

__all__ = ["EpochLog", "FastForward", "fast_forward", "fetch"]

Ref = tuple[int, int]  # (segment number in the plan, sample index in the shard)


@dataclass
class EpochLog:
    """What the data held that the plan alone cannot tell: bad samples, short segments."""

    bad: set[Ref] = field(default_factory=set)
    got: dict[int, int] = field(default_factory=dict)  # segment -> samples before it ended

    def to_state(self) -> dict:
        return {"bad": sorted([s, i] for s, i in self.bad),
                "short": sorted([s, g] for s, g in self.got.items())}

    @classmethod
    def from_state(cls, d: dict) -> EpochLog:
        return cls({(int(s), int(i)) for s, i in d.get("bad", [])},
                   {int(s): int(g) for s, g in d.get("short", [])})


class _Walker:
    """Walks segments in a fixed order yielding good refs; mirrors one lane's reading."""

    def __init__(self, segs: Sequence[Segment], order: list[int], log: EpochLog) -> None:
        self.segs, self.order, self.log = segs, order, log
        self.n = 0  # position in `order`
        self.idx = segs[order[0]].start if order else 0
        self.bad = 0  # bad + lost samples passed (for the bad-fraction count)

    def next_good(self) -> Ref | None:
        while self.n < len(self.order):
            si = self.order[self.n]
            seg = self.segs[si]
            end = seg.start + self.log.got.get(si, len(seg))
            while self.idx < end:
                i = self.idx
                self.idx += 1
                if (si, i) in self.log.bad:
                    self.bad += 1
                    continue
                return si, i
            self.bad += len(seg) - (end - seg.start)
            self.n += 1
            if self.n < len(self.order):
                self.idx = self.segs[self.order[self.n]].start
        return None

    @property
    def position(self) -> tuple[int, int]:
        return self.n, self.idx


@dataclass
class FastForward:
    """The state of an epoch after `position` yielded samples."""

    buffer: list[Ref]  # shuffle buffer contents (in order), or what is left to drain
    draining: bool
    rng_state: object | None
    n_good: int  # good samples consumed from the merge + top-ups
    bad: int
    phase: str  # "main" | "topup" | "done"
    lanes: LanePositions | None  # main phase: where the lanes are
    topup: tuple[int, int, int] | None  # topup phase: (pass, n-th segment, next index)


def fast_forward(segs: Sequence[Segment], k: int, log: EpochLog, length: int, position: int,
                 shuffle_buffer: int, rng_seed: int | None) -> FastForward:
    """Simulate the epoch up to `position` yielded samples (rng_seed None: no shuffle)."""
    lanes = {j: _Walker(segs, list(range(j, len(segs), k)), log) for j in range(min(k, len(segs)))}
    turns = collections.deque(lanes)
    state = {"phase": "main", "n": 0, "topup": None}
    top = _Walker(segs, list(range(len(segs))), log)
    passes = [1]

    def goods() -> Iterator[Ref]:
        while turns and state["n"] < length:
            j = turns.popleft()
            r = lanes[j].next_good()
            if r is not None:
                turns.append(j)
                state["n"] += 1
                yield r
        state["phase"] = "topup"
        in_pass = 0
        while state["n"] < length:
            r = top.next_good()
            if r is None:  # a pass ended: the next one starts
                if in_pass == 0:  # the stream raised BadDataError here: no cursor gets past it
                    raise ValueError("cursor lies beyond a top-up pass without good samples")
                passes[0] += 1
                in_pass = 0
                top.n, top.idx = 0, segs[0].start
                continue
            in_pass += 1
            state["n"] += 1
            yield r
        state["phase"] = "done"

    rng = random.Random(rng_seed) if rng_seed is not None else None
    buf: list[Ref] = []
    out = 0
    draining = False
    src = goods()
    if position > 0:
        if rng is None:
            for _ in src:
                out += 1
                if out == position:
                    break
        else:
            for r in src:
                if len(buf) < shuffle_buffer:
                    buf.append(r)
                    continue
                j = rng.randrange(len(buf))
                buf[j] = r
                out += 1
                if out == position:
                    break
            else:
                rng.shuffle(buf)
                draining = True
                buf = buf[position - out :]
    bad = sum(w.bad for w in lanes.values())
    pos = LanePositions({j: w.position for j, w in lanes.items()}, list(turns))
    return FastForward(buf, draining, rng.getstate() if rng else None, state["n"], bad,
                       state["phase"], pos if state["phase"] == "main" else None,
                       (passes[0], *top.position) if state["phase"] == "topup" else None)


def fetch(refs: Sequence[Ref], segs: Sequence[Segment], urls: Sequence[str], *,
          storage_options: dict | None, num_classes: int | None, validate: str,
          count: Callable[[str, int], None], workers: int,
          spec: SampleSpec = DEFAULT_SPEC, cache: ShardCache | None = None) -> list[Good]:
    """Read the samples `refs` point at (one pass per shard, up to the last one needed)."""
    need: dict[str, set[int]] = collections.defaultdict(set)
    for si, i in refs:
        need[urls[segs[si].shard]].add(i)

    def read(url: str, stop: Callable[[], bool]) -> dict[int, tuple[str, dict[str, bytes]]]:
        want, last, got = need[url], max(need[url]), {}
        with open_shard(url, storage_options, cache=cache, count=count,
                        on_retry=lambda e: count("retries", 1)) as f:
            try:
                samples = iter_tar_samples(f, max_member_bytes=spec.max_member_bytes, stop=stop)
                for i, (key, parts) in enumerate(samples):
                    if i in want:
                        got[i] = (key, parts)
                        count("refetched", 1)
                    if i >= last:
                        break
            except ShardEnded:
                pass
        if len(got) != len(want):
            raise RuntimeError(f"cannot resume: {url} no longer holds the samples the cursor "
                               "refers to (the shards changed since it was saved)")
        return got

    data = dict(zip(need, run_each(read, list(need), workers=workers, name="sslstream-refetch"),
                    strict=True))
    out = []
    for si, i in refs:
        url = urls[segs[si].shard]
        key, parts = data[url][i]
        g = check_sample(key, parts, url, segs[si].padded, num_classes, validate, si, i, spec)
        if not isinstance(g, Good):
            raise RuntimeError(f"cannot resume: sample {key} of {url} was good when the cursor "
                               f"was saved and is now {g.reason} (the shards changed)")
        out.append(g)
    return out
