"""`SampleStream`: what the loaders need from a stream of samples, as a typed Protocol.

`ShardStream` (stream.py) is the one implementation the product builds; the two-view loader
(pipelines/views/loader.py, hostprep.py, workers.py) and the eval loader
(pipelines/views/eval_loader.py) take any object with these members, and nothing else is
asked of it: no member is probed for, every one is part of the contract. A test's stream
over a list implements all of them too (tests/pipelines/augment_helpers.py: FakeStream).

What each member is for:

- iteration and size: one epoch of this rank's samples from the cursor on (a generator, so
  an abandoned epoch can be closed), and how many that is (the same on every rank);
- the cursor: `set_epoch`, `state_dict(position=...)` (a prefetching consumer saves the
  cursor of what it really consumed), `load_state_dict`, and `position` (samples of the
  epoch read so far; the trainer's copy is told how far a reader process got);
- the bad-sample limit, which the stream owns: `count_bad` for a sample the consumer's
  decoder rejected after the stream yielded it, `set_external_bad` for the count of the
  stream's copy in a reader process, `epoch_bad` for the sum this copy knows of;
- what the loaders adapt to: `validate` (the image check the stream already ran: the host
  then only reads sizes), `rank` / `world_size` / `partition` (whether the stream already
  holds only this rank's share of an evaluation split), `num_workers` and `lane_pool` (a
  reader process hands the stream's reader lanes to lane processes).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Protocol

from sslstream.pipelines.shards.sample import Sample

if TYPE_CHECKING:
    from sslstream.pipelines.shards.lanes import LaneHandle

__all__ = ["SampleStream"]


class SampleStream(Protocol):
    """A rank's resumable stream of `Sample`s (see the module docstring)."""

    rank: int
    world_size: int
    partition: bool  # True: this rank's contiguous share of the split, each sample once
    validate: str  # the check already run on every image: "none" | "header" | "decode"
    num_workers: int  # reader lanes (0: read inline)
    lane_pool: LaneHandle | None  # lane processes to run the lanes in (None: threads)
    position: int  # samples of the current epoch read so far

    def __len__(self) -> int: ...

    def __iter__(self) -> Generator[Sample, None, None]: ...

    def set_epoch(self, epoch: int) -> None: ...

    def state_dict(self, position: int | None = None) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    @property
    def counters(self) -> dict[str, int]: ...

    @property
    def epoch_bad(self) -> int: ...

    def count_bad(self, reason: str, shard: str, n: int = 1) -> None: ...

    def set_external_bad(self, n: int, shard: str) -> None: ...
