"""Reader lanes in processes: the tar parsing, gunzip and header checks of a stream's lanes
run in `n` worker processes instead of threads of the reading process.

Why: the lanes' work is Python (~20 us per small sample) and threads share one GIL; with
`loader.workers > 1` the lanes of one rank's stream run on several cores. What changes is
only *where* lane j runs (process j % n); the lanes themselves, their segments and the
round-robin merge (reader.LaneReader) are the stream's, so the samples and their order are
the same whatever n (and resume stays exact: the merge and its log run in the stream).

Protocol: one result queue per lane (bounded), one task queue per process. A job id in a
shared value marks the current job; a process abandons a job as soon as the id changes, and
the consumer skips messages of older jobs. A process feeds its lanes round-robin with
non-blocking puts, so a lane whose queue is full never blocks the others (the merge may be
waiting on one of them). Items travel in chunks with the counters they caused.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sslstream.pipelines.shards.procs import (
    WorkerError,
    child_setup,
    describe_exit,
    portable_error,
    start_process,
    stop_process,
)

POLL_S = 0.1
CHUNK = 32


@dataclass
class LaneHandle:
    """What the reading process needs to use the pool (passed at spawn time: mp queues
    travel only by inheritance)."""

    tasks: list            # per process
    results: list          # per lane
    current: Any           # shared job id
    procs: int
    pids: list[int]
    _job: int = 0

    def next_job(self) -> int:
        self._job += 1
        return self._job

    def submit(self, job: int, spec: dict, lanes: list[int]) -> None:
        self.current.value = job
        for p in range(self.procs):
            mine = [j for j in lanes if j % self.procs == p]
            if mine:
                self.tasks[p].put((job, spec, mine))

    def cancel(self, job: int) -> None:
        if self.current.value == job:
            self.current.value = -1

    def items(self, job: int, lane: int, count) -> Iterator:
        """Items of `lane` for `job`, in order; raises a lane's error; never hangs on a
        dead process."""
        q = self.results[lane]
        while True:
            try:
                msg = q.get(timeout=POLL_S)
            except queue.Empty:
                self._check(lane)
                continue
            if msg[0] != job:
                continue
            _, kind, body, counts = msg
            for name, n in counts.items():
                count(name, n)
            if kind == "end":
                return
            if kind == "error":
                raise body
            yield from body

    def _check(self, lane: int) -> None:
        pid = self.pids[lane % self.procs]
        try:
            os.kill(pid, 0)
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            dead = state in ("Z", "X")
        except (OSError, IndexError):
            dead = True
        if dead:
            raise WorkerError(f"loader lane process {pid} (lane {lane}) died without "
                              "reporting an error")


def _lane_main(index: int, tasks: Any, results: list, current: Any, parent: int) -> None:
    from sslstream.pipelines.shards.reader import LaneReader

    child_setup(parent)
    for task in iter(tasks.get, None):  # None: stop (a dead parent is child_setup's watcher's)
        job, spec, mine = task
        counts: Counter[str] = Counter()

        def count(name: str, n: int = 1, counts: Counter = counts) -> None:
            counts[name] += n

        reader = LaneReader(spec["urls"], spec["segments"], lanes=spec["k"],
                            storage_options=spec["storage_options"],
                            num_classes=spec["num_classes"], validate=spec["validate"],
                            count=count, start=spec["start"], spec=spec["sample_spec"],
                            cache=spec["cache"])

        def gone(job: int = job) -> bool:  # the consumer moved on: stop the read in progress
            return current.value != job

        _run_job(job, {j: reader._lane_items(j, gone) for j in mine}, results, current, counts)


def _run_job(job: int, gens: dict, results: list, current: Any, counts: Counter) -> None:
    """Feed each lane's queue in turn; a full queue is skipped, not waited on."""
    pending: dict[int, collections.deque] = {j: collections.deque() for j in gens}
    try:
        while any(pending.values()) or gens:
            if current.value != job:
                return
            progressed = False
            for j in list(pending):
                if not pending[j] and j in gens:  # read the next chunk of lane j
                    chunk: list = []
                    try:
                        for item in gens[j]:
                            chunk.append(item)
                            if len(chunk) >= CHUNK:
                                break
                        else:
                            gens.pop(j).close()
                            pending[j].append((job, "items", chunk, dict(counts)))
                            chunk = []
                            pending[j].append((job, "end", None, {}))
                    except BaseException as e:  # after what was read, in order
                        gens.pop(j, None)
                        pending[j].append((job, "items", chunk, dict(counts)))
                        chunk = []
                        pending[j].append((job, "error", portable_error(e), {}))
                    if chunk:
                        pending[j].append((job, "items", chunk, dict(counts)))
                    counts.clear()
                while pending[j]:
                    try:
                        results[j].put(pending[j][0], block=False)
                    except queue.Full:
                        break
                    pending[j].popleft()
                    progressed = True
            if not progressed:
                time.sleep(0.002)
    finally:
        for g in gens.values():
            g.close()


class LanePool:
    """`n` lane processes for a stream with `lanes` lanes (started now, stopped by close)."""

    def __init__(self, n: int, *, lanes: int, ctx) -> None:
        self.n = max(1, min(int(n), max(1, lanes)))
        self._tasks = [ctx.Queue() for _ in range(self.n)]
        self._results = [ctx.Queue(maxsize=8) for _ in range(max(1, lanes))]
        self._current = ctx.Value("q", -1, lock=False)
        self._procs = [ctx.Process(target=_lane_main, name=f"sslstream-lanes{i}", daemon=True,
                                   args=(i, self._tasks[i], self._results, self._current,
                                         os.getpid()))
                       for i in range(self.n)]
        for p in self._procs:
            start_process(p)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.pid]

    def handle(self) -> LaneHandle:
        return LaneHandle(self._tasks, self._results, self._current, self.n, self.pids)

    def check_alive(self) -> None:
        for p in self._procs:
            if not p.is_alive():
                raise WorkerError(f"loader lane process {p.pid} died ({describe_exit(p)}) "
                                  "without reporting an error")

    def close(self, timeout_s: float = 5.0) -> None:
        self._current.value = -1
        for q in self._tasks:
            with contextlib.suppress(Exception):
                q.put(None)
        for p in self._procs:
            stop_process(p, timeout_s)
        for q in self._tasks + self._results:
            q.cancel_join_thread()
            q.close()
