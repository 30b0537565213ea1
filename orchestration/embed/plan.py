"""Which output file holds which input shards, and which rank writes it.

The unit of output is a *part*: `shards_per_part` consecutive input shards (in the source's
listed order) embedded into one Parquet file, ``part-<NNNNNN>.parquet``. A part file exists
whole or not at all (store.py), so "is the part there?" is the whole resume state: a rerun
embeds exactly the parts that are missing, and every input sample ends up in exactly one
file. The plan is a pure function of the shard list, so it is the same in every process
and every rerun; the parts a rank writes depend on the rank count, but never overlap, so a
job killed at W ranks resumes at W' ranks.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")


@dataclass(frozen=True)
class Part:
    number: int
    shards: tuple[int, ...]          # indices into the source's shard list
    samples: int                     # as listed (manifest or counted)

    @property
    def name(self) -> str:
        return part_name(self.number)


def part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def plan_parts(counts: Sequence[int], shards_per_part: int) -> list[Part]:
    """Consecutive groups of `shards_per_part` shards, numbered from 0."""
    if shards_per_part < 1:
        raise ValueError(f"shards_per_part={shards_per_part}: expected >= 1")
    parts = []
    for number, lo in enumerate(range(0, len(counts), shards_per_part)):
        idx = tuple(range(lo, min(lo + shards_per_part, len(counts))))
        parts.append(Part(number, idx, sum(int(counts[i]) for i in idx)))
    return parts


def rank_parts(parts: Sequence[Part], rank: int, world_size: int) -> list[Part]:
    """Rank ``rank``'s parts: a contiguous run, balanced by sample count (a part goes to
    the rank whose share of the samples holds the part's middle sample)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} outside world_size={world_size}")
    total = sum(p.samples for p in parts)
    mine, start = [], 0
    for p in parts:
        middle = start + p.samples / 2.0
        owner = min(world_size - 1, int(middle * world_size // total)) if total else \
            p.number % world_size
        if owner == rank:
            mine.append(p)
        start += p.samples
    return mine


def source_fingerprint(urls: Sequence[str], counts: Sequence[int]) -> str:
    """What the input is, for the output's manifest: sha256 of the shard list and counts."""
    canon = json.dumps([list(urls), [int(c) for c in counts]], separators=(",", ":"))
    return hashlib.sha256(canon.encode()).hexdigest()[:16]
