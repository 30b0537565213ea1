"""The evaluation loader: one deterministic view of every sample, exactly once.

kNN and linear-probe numbers are only comparable across runs if the eval inputs never change:
no random crop, no shuffling, no padding, no duplicated sample. Shorter side resized, centre
crop, normalised -- the standard protocol.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from sslstream.pipelines.shards.sample_stream import SampleStream
from sslstream.pipelines.shards.validate import CorruptImage, validate_image
from sslstream.pipelines.views import dali as dali_mod
from sslstream.pipelines.views.backend import effective_validation, image_hw, resolve_backend
from sslstream.pipelines.views.recipes import IMAGENET_MEAN, IMAGENET_STD


def eval_resize(size: int) -> int:
    """Shorter side before the centre crop: 256 for 224 (ratio 0.875); no resize at CIFAR sizes."""
    return size if size <= 64 else int(round(size * 256 / 224))


@dataclass
class EvalBatch:
    """One batch with what identifies its rows: ``x`` (B, 3, S, S) normalised, ``labels``
    (B,) (-1: none), ``index`` (B,) split positions, and each row's sample key and shard URL;
    ``dropped``: the shard URL of each sample of this batch the decoder refused (skipped,
    counted in `EvalLoader.skipped_corrupt`)."""

    x: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    keys: list[str]
    shards: list[str]
    dropped: list[str]


class EvalLoader:
    """Deterministic single view of this rank's share of the samples, each exactly once.

    A partitioned stream (`partition=True` for this rank and world size: what
    build_eval_loader makes) already yields only this rank's contiguous share of the split,
    so each rank reads ~1/W of the bytes. A stream that is not partitioned is read whole
    and rank r keeps the samples at positions r, r + W, ... Either way every sample lands
    on exactly one rank even when the count does not divide by W. Keys already seen are
    skipped, so the stream's wrap-around top-ups after a corrupt sample never count twice.
    Runs in the caller's thread; corrupt samples are skipped and counted.
    `with_index=True` yields (x, labels, index) with each sample's position in the split
    (Sample.index; where that is unknown, -1, the position in the whole stream), which
    identifies it across rank counts.
    """

    def __init__(self, stream: SampleStream, *, image_size: int, batch_size: int, device: torch.device | str,
                 backend: str = "auto", num_threads: int = 2, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, validate: str = "auto", rank: int = 0,
                 world_size: int = 1, with_index: bool = False) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"eval loader rank={rank} outside world_size={world_size}")
        self.stream, self.batch_size = stream, batch_size
        self.validate = effective_validation(validate, stream)
        self.rank, self.world_size = rank, world_size
        self.with_index = with_index
        # the stream already holds only this rank's share: no striding here
        self.presplit = stream.partition and (stream.rank, stream.world_size) == (rank, world_size)
        self.device = torch.device(device)
        self.backend_name = resolve_backend(backend)
        resize = eval_resize(image_size)
        if self.backend_name == "dali":
            device_id = None
            if self.device.type == "cuda":
                device_id = self.device.index if self.device.index is not None \
                    else torch.cuda.current_device()
            self._backend = dali_mod.DaliEval(image_size, resize, mean, std, batch_size,
                                              device_id, num_threads)
        else:
            from sslstream.pipelines.views.reference import TorchvisionEval

            self._backend = TorchvisionEval(image_size, resize, mean, std, num_threads)
        self.skipped_corrupt = 0
        self.image_size = int(image_size)

    @property
    def num_samples(self) -> int:
        """Samples of this rank (an upper bound when corrupt samples get skipped)."""
        if self.presplit:
            return len(self.stream)
        return len(range(self.rank, len(self.stream), self.world_size))

    def __len__(self) -> int:
        """Batches of this rank (an upper bound when corrupt samples get skipped)."""
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for b in self.batches():
            yield (b.x, b.labels, b.index) if self.with_index else (b.x, b.labels)

    def batches(self) -> Iterator[EvalBatch]:
        """The batches with their rows' keys and shards (`sslstream embed` writes them)."""
        images: list[bytes] = []
        labels: list[int] = []
        index: list[int] = []
        keys: list[str] = []
        shards: list[str] = []
        seen: set[str] = set()
        for sample in self.stream:
            ident = (sample.shard, sample.key) if self.presplit else sample.key
            if ident in seen:
                continue
            seen.add(ident)
            pos = len(seen) - 1
            if not self.presplit and pos % self.world_size != self.rank:
                continue
            try:
                image_hw(sample.image, self.validate)
            except CorruptImage:
                self.skipped_corrupt += 1
                continue
            images.append(sample.image)
            labels.append(int(sample.label))
            index.append(sample.index if sample.index >= 0 else pos)
            keys.append(sample.key)
            shards.append(sample.shard)
            if len(images) == self.batch_size:
                yield self._emit(images, labels, index, keys, shards)
                images, labels, index, keys, shards = [], [], [], [], []
        if images:
            yield self._emit(images, labels, index, keys, shards)

    def _emit(self, images: list[bytes], labels: list[int], index: list[int], keys: list[str],
              shards: list[str]) -> EvalBatch:
        x, y, keep = self._run(images, labels)
        kept = set(keep)
        return EvalBatch(x, y, torch.tensor([index[i] for i in keep], dtype=torch.int64,
                                            device=self.device),
                         [keys[i] for i in keep], [shards[i] for i in keep],
                         [shards[i] for i in range(len(shards)) if i not in kept])

    def _run(self, images: list[bytes], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        keep = list(range(len(images)))
        try:
            x = self._backend.run(images)
        except Exception as error:  # a header-valid but undecodable image: drop it, count it
            keep = []
            for i, data in enumerate(images):
                try:
                    validate_image(data, "decode")
                    keep.append(i)
                except CorruptImage:
                    self.skipped_corrupt += 1
            if len(keep) == len(images):
                raise RuntimeError(f"eval backend {self.backend_name} failed on a batch: "
                                   f"{error}") from error
            self._backend.reset()
            if not keep:  # every image of the batch was undecodable: an empty batch
                s = self.image_size
                return (torch.zeros(0, 3, s, s, device=self.device),
                        torch.zeros(0, dtype=torch.int64, device=self.device), [])
            images, labels = [images[i] for i in keep], [labels[i] for i in keep]
            x = self._backend.run(images)
        return (x.to(self.device), torch.tensor(labels, dtype=torch.int64, device=self.device),
                keep)

    def close(self) -> None:
        self._backend.close()


def build_eval_loader(urls: str | Sequence[str], *, image_size: int, batch_size: int,
                      device: torch.device | str, storage_options: dict | None = None,
                      rank: int = 0, world_size: int = 1, num_workers: int = 2,
                      backend: str = "auto", mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      num_threads: int = 2, validate: str = "auto",
                      stream_options: dict | None = None, max_samples: int = 0,
                      with_index: bool = False, max_bad_fraction: float = 0.01) -> EvalLoader:
    """Eval loader over `urls`: unshuffled, unpadded, each sample on exactly one rank,
    each rank reading only its contiguous share of the split (ShardStream partition=True).

    `max_samples` > 0 reads only as few whole shards as hold that many samples, spread
    evenly over the list (plan.spread_shards; a budget for periodic evaluation of a large
    split), the same shards for any rank count. `stream_options`: more ShardStream
    arguments (label_key, image_keys, max_pixels, require_label: see sample_options). Any
    other `SampleStream` goes to `EvalLoader` directly.
    """
    from sslstream.pipelines.shards.plan import spread_shards
    from sslstream.pipelines.shards.stream import ShardStream

    def make(spec: str | Sequence[str]) -> ShardStream:
        return ShardStream(spec, rank=rank, world_size=world_size, num_workers=num_workers,
                           shuffle=False, exact_epoch=False, partition=True,
                           storage_options=storage_options, max_bad_fraction=max_bad_fraction,
                           validate="header" if validate == "auto" else validate,
                           **(stream_options or {}))

    stream = make(urls)
    if max_samples > 0:
        chosen = spread_shards(stream.shard_counts, int(max_samples))
        if len(chosen) < len(stream.shard_urls):
            stream = make([stream.shard_urls[i] for i in chosen])
    return EvalLoader(stream, image_size=image_size, batch_size=batch_size, device=device,
                      backend=backend, num_threads=num_threads, mean=mean, std=std,
                      validate=validate, rank=rank, world_size=world_size,
                      with_index=with_index)
