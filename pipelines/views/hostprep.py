"""Host-side batch preparation, torch-free: the part of the loader that reader processes run.

Batch k of an epoch = stream samples [kB, (k+1)B): their sizes are read (and, per
`validate`, their headers checked), bad samples are replaced by the nearest good neighbour of
the same batch (counted), a short last batch is padded from itself, and both views'
parameters are drawn from the key (seed, epoch, rank, k, view). Nothing here depends on where
it runs: the loader's host thread (workers=0) and a reader process (pipelines/views/workers.py)
run the same generator, so the batches are the same whatever the number of workers.

No torch, no DALI imports: a spawned reader process starts in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from sslstream.pipelines.shards.badsamples import reason_of, report_bad
from sslstream.pipelines.shards.imagesize import image_hw as read_hw
from sslstream.pipelines.shards.sample import Sample
from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.shards.validate import CorruptImage, validate_image
from sslstream.pipelines.views.recipes import (
    TwoViewRecipe,
    ViewParams,
    batch_rng,
    sample_view_params,
)


@dataclass
class HostBatch:
    index: int
    images: list  # encoded images: bytes, or memoryview slices of one buffer (from a worker)
    hw: np.ndarray
    labels: list[int]
    keys: list[str]
    shards: list[str]
    stream_state: dict
    params: tuple[ViewParams, ...] | None = None  # one per view of the recipe, globals first
    n_bad: int = 0   # samples replaced in this batch (counted by whoever consumes it)
    n_pad: int = 0
    release: Callable[[], None] | None = None  # frees the worker's shared-memory slot

    def done(self) -> None:
        """The backend has produced this batch's views: the images are not needed again."""
        if self.release is not None:
            release, self.release = self.release, None
            release()


def image_hw(data: bytes, validate: str) -> tuple[int, int]:
    """(H, W) after the check `validate` asks for ("none": the size only); CorruptImage if bad."""
    if validate != "none":
        info = validate_image(data, validate)
        if info is not None and info.width and info.height:
            return info.height, info.width
    return read_hw(data)


def nearest(good: list[int], i: int) -> int:
    """The good index closest to i (ties: the earlier one) -- deterministic replacement."""
    return min(good, key=lambda g: (abs(g - i), g))


def prepare(index: int, samples: list[Sample], state: dict, batch_size: int, validate: str,
            stream: SampleStream) -> HostBatch:
    """Validate, read sizes, replace bad samples by good neighbours, pad a short batch.
    Rejected samples are reported to `stream` (toward max_bad_fraction, per reason)."""
    hw: list[tuple[int, int] | None] = []
    rejected: list[tuple[str, str]] = []  # (reason, shard)
    for s in samples:
        try:
            hw.append(image_hw(s.image, validate))
        except CorruptImage as e:
            hw.append(None)
            rejected.append((reason_of(e), s.shard))
    report_bad(stream, rejected)
    good = [i for i, v in enumerate(hw) if v is not None]
    if not good:
        raise RuntimeError(f"every sample of batch {index} is corrupt (shards "
                           f"{sorted({s.shard for s in samples})}); is the data readable?")
    n_bad = len(samples) - len(good)
    order = [i if hw[i] is not None else nearest(good, i) for i in range(len(samples))]
    n_pad = batch_size - len(samples)
    order += [good[j % len(good)] for j in range(n_pad)]
    return HostBatch(index=index, images=[samples[i].image for i in order],
                     hw=np.array([hw[i] for i in order], dtype=np.int64),
                     labels=[int(samples[i].label) for i in order],
                     keys=[samples[i].key for i in order],
                     shards=[samples[i].shard for i in order], stream_state=state,
                     n_bad=n_bad, n_pad=n_pad)


def draw_params(recipe: TwoViewRecipe, seed: int, epoch: int, rank: int, index: int,
                hw: np.ndarray) -> tuple[ViewParams, ...]:
    """Every view's parameters for batch `index`: view i (0, 1 the global crops, 2.. the
    local ones) from the key (seed, epoch, rank, index, i), so adding local crops leaves the
    global crops' parameters as they were."""
    return tuple(sample_view_params(view, hw, batch_rng(seed, epoch, rank, index, i))
                 for i, view in enumerate(recipe.views))


def position_stream(stream: SampleStream, epoch: int, position: int,
                    stream_state: dict | None) -> None:
    """Put `stream` where batch `position` of `epoch` starts: a saved cursor, or the epoch's
    start (set_epoch keeps a same-epoch cursor, so the start is loaded explicitly)."""
    if position > 0 and stream_state is not None:
        stream.load_state_dict(stream_state)
        return
    if position > 0:
        raise RuntimeError("loader resumed at batch > 0 without a stream cursor")
    stream.set_epoch(epoch)
    stream.load_state_dict(stream.state_dict(position=0))


def host_batches(stream: SampleStream, recipe: TwoViewRecipe, *, epoch: int, start: int, total: int,
                 batch_size: int, validate: str, seed: int, rank: int,
                 stopped: Callable[[], bool]) -> Iterator[HostBatch]:
    """Batches start..total-1 of the epoch the stream is positioned at, with parameters."""
    it = iter(stream)  # a generator: closing it stops the stream's reading
    try:
        for index in range(start, total):
            samples = []
            for sample in it:
                samples.append(sample)
                if len(samples) == batch_size or stopped():
                    break
            if stopped():
                return
            if not samples:
                raise RuntimeError(
                    f"stream ended after {index} of {total} batches (len(stream)="
                    f"{len(stream)}, batch_size={batch_size}): it yielded fewer "
                    "samples than its len() promised")
            host = prepare(index, samples, stream.state_dict(), batch_size, validate, stream)
            host.params = draw_params(recipe, seed, epoch, rank, index, host.hw)
            yield host
    finally:
        it.close()
