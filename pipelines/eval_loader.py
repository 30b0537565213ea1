"""The evaluation loader: one deterministic view of every sample, exactly once.

kNN and linear-probe numbers are only comparable across runs if the eval inputs never change:
no random crop, no shuffling, no padding, no duplicated sample. Shorter side resized, centre
crop, normalised -- the standard protocol.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from pipelines import dali as dali_mod
from pipelines.loader import image_hw, resolve_backend
from pipelines.recipes import IMAGENET_MEAN, IMAGENET_STD
from pipelines.validate import CorruptImage


def eval_resize(size: int) -> int:
    """Shorter side before the centre crop: 256 for 224 (ratio 0.875); no resize at CIFAR sizes."""
    return size if size <= 64 else int(round(size * 256 / 224))


class EvalLoader:
    """Deterministic single view of every sample of this rank, exactly once, in stream order.

    Runs in the caller's thread: evaluation passes are short and an extra thread would only
    complicate shutdown. Corrupt samples are skipped and counted (never duplicated).
    """

    def __init__(self, stream, *, image_size: int, batch_size: int, device: torch.device | str,
                 backend: str = "auto", num_threads: int = 2, mean=IMAGENET_MEAN,
                 std=IMAGENET_STD, validate: str = "header") -> None:
        self.stream, self.batch_size, self.validate = stream, batch_size, validate
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
            from pipelines.reference import TorchvisionEval

            self._backend = TorchvisionEval(image_size, resize, mean, std, num_threads)
        self.skipped_corrupt = 0

    def __len__(self) -> int:
        return -(-len(self.stream) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images: list[bytes] = []
        labels: list[int] = []
        for sample in self.stream:
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
        x = self._backend.run(images)
        return x.to(self.device), torch.tensor(labels, dtype=torch.int64, device=self.device)

    def close(self) -> None:
        self._backend.close()


def build_eval_loader(urls, *, image_size: int, batch_size: int, device: torch.device | str,
                      storage_options: dict | None = None, rank: int = 0, world_size: int = 1,
                      num_workers: int = 2, backend: str = "auto", mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, stream=None, num_threads: int = 2) -> EvalLoader:
    """Eval loader over `urls` (unshuffled, unpadded: each sample once across ranks).

    `stream` replaces the ShardStream built from `urls` (tests, custom sources).
    """
    if stream is None:
        from pipelines.stream import ShardStream

        stream = ShardStream(urls, rank=rank, world_size=world_size, num_workers=num_workers,
                             shuffle=False, exact_epoch=False, storage_options=storage_options)
    return EvalLoader(stream, image_size=image_size, batch_size=batch_size, device=device,
                      backend=backend, num_threads=num_threads, mean=mean, std=std)
