"""Resuming an epoch on another number of ranks: what is left of it, laid out anew.

Why this works: an epoch's global order of positions is a function of (seed, epoch) alone
(pipelines/shards/plan.py); the number of ranks W only decides where it is cut into slices.
A stop after k steps leaves every rank's cursor (position, bad-sample log) in the
checkpoint, and a cursor says exactly which samples of its slice the rank has finished
with: the simulation of pipelines/shards/resume.py (`unfinished`) replays the lane merge,
the top-ups and the shuffle buffer on indices. What no rank finished with -- samples no lane
reached yet, samples read into a shuffle buffer but never yielded, and the tail that the old
plan left out (`exact_epoch=false`: fewer than W samples; the stream adds it) -- is the rest
of the epoch, in the global order. A resume on W' ranks lays that rest end to end and cuts it into
W' equal slices (`plan.layout`), so every sample of the epoch is seen once across the two
parts (MosaicML streaming's elastic resume does the same with its sample partition).

Lengths: every new rank counts the samples each old rank had consumed as read (`base`, the
same on every rank), and reads `len(stream) - base` more, so the epoch keeps the number of
steps a fresh epoch on W' ranks has. When the rest is shorter than that (samples the old
ranks skipped as bad and had not yet replaced; or a smaller global batch), the layout wraps
around over the rest (padding, counted `padded`); when it is longer (`exact_epoch=false`
drops a tail of fewer than W' samples anyway), its last samples are left out this epoch.

The request is rank-independent (every new rank gets the same one, built by the trainer
from the checkpoint: `request`); the stream computes its own slice from it and saves it in
its cursor as `origin`, so a second stop and resume, on any number of ranks, works too (the
origin's cursors are then themselves simulated on the plan the origin gave them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sslstream.pipelines.shards.plan import Segment
from sslstream.pipelines.shards.resume import EpochLog, unfinished

__all__ = ["OldRank", "Reshard", "remainder", "request"]


@dataclass(frozen=True)
class OldRank:
    """One rank of the stopped run: its plan for the epoch and how far it got."""

    segments: Sequence[Segment]
    length: int          # samples the plan yields
    position: int        # samples of the plan it had yielded
    log: EpochLog
    lanes: int
    shuffle_buffer: int
    shuffle_seed: int | None  # None: no shuffle buffer


@dataclass(frozen=True)
class Reshard:
    """An epoch continued on this run's ranks: what is left of it, from `base` on."""

    epoch: int
    base: int
    pieces: tuple[Segment, ...]
    origin: dict[str, Any]  # the request it came from (saved with every cursor)
    left: int               # samples of the rest (sum of the pieces)
    token: str              # names the origin (a digest of it)


def remainder(olds: Sequence[OldRank]) -> list[Segment]:
    """What the ranks in `olds` (in rank order) left of the epoch, in its global order."""
    out: list[Segment] = []
    for o in olds:
        if o.position > o.length:
            raise ValueError(f"cursor position {o.position} past its plan of {o.length} samples")
        out.extend(unfinished(o.segments, o.lanes, o.log, o.length, o.position,
                              o.shuffle_buffer, o.shuffle_seed))
    return out


def request(cursors: Sequence[dict[str, Any]], base: int) -> dict[str, Any]:
    """The stream state that continues the epoch of `cursors` (every old rank's, in rank
    order) on any number of ranks, each rank counting `base` samples as read: load it with
    `ShardStream.load_state_dict` on every new rank."""
    epochs = {int(c["epoch"]) for c in cursors}
    if len(epochs) != 1:
        raise ValueError(f"the ranks' cursors are in different epochs: {sorted(epochs)}")
    return {"version": 3, "epoch": epochs.pop(), "position": int(base),
            "origin": {"base": int(base), "cursors": [dict(c) for c in cursors]}}
