"""The evaluation loader: one deterministic view of every sample, exactly once.

kNN and linear-probe numbers are only comparable across runs if the eval inputs never change:
no random crop, no shuffling, no padding, no duplicated sample. Shorter side resized, centre
crop, normalised -- the standard protocol.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines.shards.validate import CorruptImage, validate_image
from pipelines.views import dali as dali_mod
from pipelines.views.backend import effective_validation, image_hw, resolve_backend
from pipelines.views.recipes import IMAGENET_MEAN, IMAGENET_STD


def eval_resize(size: int) -> int:
    """Shorter side before the centre crop: 256 for 224 (ratio 0.875); no resize at CIFAR sizes."""
    return size if size <= 64 else int(round(size * 256 / 224))


class EvalLoader:
    """Deterministic single view of this rank's share of the samples, each exactly once.

    The stream is read whole (unshuffled, world_size=1) and rank r keeps the samples at
    positions r, r + W, r + 2W, ...: every sample lands on exactly one rank even when the
    count does not divide by W (ShardStream's rank split either drops or pads that
    remainder). Keys already seen are skipped, so the stream's wrap-around top-ups after a
    corrupt sample never count twice. Cost: every rank reads the whole split (eval splits
    are small). Runs in the caller's thread; corrupt samples are skipped and counted.
    """

    def __init__(self, stream, *, image_size: int, batch_size: int, device: torch.device | str,
                 backend: str = "auto", num_threads: int = 2, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, validate: str = "auto", rank: int = 0,
                 world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"eval loader rank={rank} outside world_size={world_size}")
        self.stream, self.batch_size = stream, batch_size
        self.validate = effective_validation(validate, stream)
        self.rank, self.world_size = rank, world_size
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
            from pipelines.views.reference import TorchvisionEval

            self._backend = TorchvisionEval(image_size, resize, mean, std, num_threads)
        self.skipped_corrupt = 0

    def __len__(self) -> int:
        """Batches of this rank (an upper bound when corrupt samples get skipped)."""
        mine = len(range(self.rank, len(self.stream), self.world_size))
        return -(-mine // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images: list[bytes] = []
        labels: list[int] = []
        seen: set[str] = set()
        for sample in self.stream:
            if sample.key in seen:
                continue
            seen.add(sample.key)
            if (len(seen) - 1) % self.world_size != self.rank:
                continue
            try:
                image_hw(sample.image, self.validate)
            except CorruptImage:
                self.skipped_corrupt += 1
                continue
            images.append(sample.image)
            labels.append(int(sample.label))
            if len(images) == self.batch_size:
                yield self._run(images, labels)
                images, labels = [], []
        if images:
            yield self._run(images, labels)

    def _run(self, images: list[bytes], labels: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
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
            if len(keep) == len(images) or not keep:
                raise RuntimeError(f"eval backend {self.backend_name} failed on a batch: "
                                   f"{error}") from error
            reset = getattr(self._backend, "reset", None)
            if reset is not None:
                reset()
            images, labels = [images[i] for i in keep], [labels[i] for i in keep]
            x = self._backend.run(images)
        return x.to(self.device), torch.tensor(labels, dtype=torch.int64, device=self.device)

    def close(self) -> None:
        self._backend.close()


def build_eval_loader(urls, *, image_size: int, batch_size: int, device: torch.device | str,
                      storage_options: dict | None = None, rank: int = 0, world_size: int = 1,
                      num_workers: int = 2, backend: str = "auto", mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, stream=None, num_threads: int = 2,
                      validate: str = "auto", stream_options: dict | None = None) -> EvalLoader:
    """Eval loader over `urls`: unshuffled, unpadded, each sample on exactly one rank.

    `stream` replaces the ShardStream built from `urls` (tests, custom sources); it must
    yield the whole split (it is strided by rank here). `stream_options`: more ShardStream
    arguments (label_key, image_keys, max_pixels, require_label: see sample_options).
    """
    if stream is None:
        from pipelines.shards.stream import ShardStream

        stream = ShardStream(urls, rank=0, world_size=1, num_workers=num_workers,
                             shuffle=False, exact_epoch=False, storage_options=storage_options,
                             validate="header" if validate == "auto" else validate,
                             **(stream_options or {}))
    return EvalLoader(stream, image_size=image_size, batch_size=batch_size, device=device,
                      backend=backend, num_threads=num_threads, mean=mean, std=std,
                      validate=validate, rank=rank, world_size=world_size)
