"""Rows of the parts being embedded, collected per part and published when a part is whole.

Rows arrive in part order (the stream reads parts one after another), possibly with a
batch spanning two parts; a row of a later part, or the end of the stream, means every
earlier part has delivered all its rows. A part is then written as one Parquet file
(parquet.py) through the output store (store.py), whole or not at all, with what its reader
skipped (per reason) in the file's metadata, so the final manifest can count bad samples of
parts written by earlier, killed runs too.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from sslstream.orchestration.embed.parquet import part_bytes
from sslstream.orchestration.embed.plan import Part
from sslstream.orchestration.embed.store import OutputStore


@dataclass
class _Rows:
    keys: list[str] = field(default_factory=list)
    shards: list[int] = field(default_factory=list)     # index into the source's shard list
    index: list[int] = field(default_factory=list)      # position in the shard
    labels: list[int] = field(default_factory=list)
    embeddings: list[np.ndarray] = field(default_factory=list)
    dropped: int = 0                                   # refused by the decoder


@dataclass(frozen=True)
class Written:
    part: Part
    rows: int
    bad: dict[str, int]


class PartWriter:
    """Collects rows for ``parts`` (in reading order) and writes each part once it is whole.

    ``bad_of(number)`` gives what the reader skipped in a finished part (reader.PartStream).
    """

    def __init__(self, parts: Sequence[Part], urls: Sequence[str], counts: Sequence[int],
                 store: OutputStore, *, dtype: str, feature_dim: int, meta: dict,
                 bad_of: Callable[[int], dict[str, int]]) -> None:
        self.parts = list(parts)
        self.order = {p.number: i for i, p in enumerate(self.parts)}
        self.urls, self.store, self.dtype, self.dim, self.meta = list(urls), store, dtype, feature_dim, meta
        self.bad_of = bad_of
        self.part_of_url: dict[str, tuple[int, int, int]] = {}  # url -> (part, shard, start in part)
        for p in self.parts:
            start = 0
            for s in p.shards:
                self.part_of_url[self.urls[s]] = (p.number, s, start)
                start += int(counts[s])
        self.rows: dict[int, _Rows] = {}
        self.next = 0                       # position (in self.parts) of the first unwritten part
        self.written: list[Written] = []
        self.bad: Counter[str] = Counter()  # of the parts written so far

    def add(self, keys: list[str], shard_urls: list[str], positions: np.ndarray,
            labels: np.ndarray, embeddings: np.ndarray, dropped: list[str]) -> list[Written]:
        """One batch's rows (positions: in the part's listed order); writes the parts this
        batch shows to be whole and returns them."""
        last = self.next
        for i, url in enumerate(shard_urls):
            number, shard, start = self.part_of_url[url]
            rows = self.rows.setdefault(number, _Rows())
            rows.keys.append(keys[i])
            rows.shards.append(shard)
            rows.index.append(int(positions[i]) - start)
            rows.labels.append(int(labels[i]))
            last = max(last, self.order[number])
        if len(shard_urls):
            for number in sorted({self.part_of_url[u][0] for u in shard_urls}):
                sel = [i for i, u in enumerate(shard_urls) if self.part_of_url[u][0] == number]
                self.rows[number].embeddings.append(embeddings[sel])
        for url in dropped:
            self.rows.setdefault(self.part_of_url[url][0], _Rows()).dropped += 1
        return self._flush(until=last)

    def finish(self) -> list[Written]:
        """The stream ended: every remaining part is whole."""
        return self._flush(until=len(self.parts))

    def _flush(self, until: int) -> list[Written]:
        out = []
        while self.next < until:
            out.append(self._write(self.parts[self.next]))
            self.next += 1
        return out

    def _write(self, part: Part) -> Written:
        rows = self.rows.pop(part.number, _Rows())
        n = len(rows.keys)
        order = sorted(range(n), key=lambda i: (rows.shards[i], rows.index[i]))
        emb = np.concatenate(rows.embeddings) if rows.embeddings else \
            np.zeros((0, self.dim), dtype=np.float32)
        bad = dict(self.bad_of(part.number))
        if rows.dropped:
            bad["undecodable"] = bad.get("undecodable", 0) + rows.dropped
        meta = {**self.meta, "part": part.number, "listed": part.samples, "rows": n, "bad": bad,
                "shards": [self.urls[s] for s in part.shards]}
        data = part_bytes([rows.keys[i] for i in order],
                          [self.urls[rows.shards[i]] for i in order],
                          np.asarray([rows.index[i] for i in order], dtype=np.int64),
                          np.asarray([rows.labels[i] for i in order], dtype=np.int64),
                          emb[order] if n else emb, self.dtype, meta)
        self.store.write_bytes(part.name, data)
        self.bad.update(bad)
        done = Written(part, n, bad)
        self.written.append(done)
        return done
