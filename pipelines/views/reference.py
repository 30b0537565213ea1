"""The same recipes in torchvision v2, fed the same per-sample parameters as the DALI graph.

Two jobs: (1) the backend on machines where DALI does not import (macOS, Windows, odd
Pythons); (2) the yardstick that parity tests hold the DALI graph against. It follows
torchvision's own semantics (contrast blends towards the mean grey level, hue rotates in
HSV, values are clamped after every step), so where DALI differs -- `color_twist` applies
brightness/contrast/saturation/hue as one affine map around mid-grey with hue rotated in
YIQ -- the parity tests measure the difference instead of hiding it.

The jitter order is fixed (brightness, contrast, saturation, hue) in both backends;
torchvision's ColorJitter draws a random order per image. See docs/augment.md.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from sslstream.pipelines.views.recipes import (
    SOLARIZE_THRESHOLD,
    ViewParams,
    ViewRecipe,
    blur_kernel_size,
)


def decode(data: bytes | np.ndarray) -> torch.Tensor:
    """Encoded JPEG/PNG/WebP -> uint8 (3, H, W) RGB tensor.

    PIL (libjpeg-turbo, the same decoder as DALI's CPU path: identical pixels on the test
    images) rather than torchvision.io, whose decoders are deprecated since 0.29.
    """
    raw = data if isinstance(data, bytes) else data.tobytes()
    with Image.open(io.BytesIO(raw)) as im:
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)


def augment_one(image: torch.Tensor, view: ViewRecipe, params: ViewParams, i: int) -> torch.Tensor:
    """Sample `i` of `params` applied to a decoded uint8 (3, H, W) image -> float (3, S, S)."""
    top, left, h, w = (int(v) for v in params.crop[i])
    x = F.resized_crop(image, top, left, h, w, [view.size, view.size],
                       interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if params.jitter[i]:
        x = F.adjust_brightness(x, float(params.brightness[i]))
        x = F.adjust_contrast(x, float(params.contrast[i]))
        x = F.adjust_saturation(x, float(params.saturation[i]))
        x = F.adjust_hue(x, float(params.hue[i]))
    if params.grayscale[i]:
        x = F.rgb_to_grayscale(x, num_output_channels=3)
    if params.blur[i]:
        sigma = float(params.sigma[i])
        k = blur_kernel_size(sigma)
        x = F.gaussian_blur(x, [k, k], [sigma, sigma])
    if params.solarize[i]:
        x = F.solarize(x, threshold=SOLARIZE_THRESHOLD)
    if params.flip[i]:
        x = F.horizontal_flip(x)
    return normalize(x, view.mean, view.std)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    return F.normalize(x.to(torch.float32) / 255.0, list(mean), list(std))


def augment_batch(images: Sequence[torch.Tensor], view: ViewRecipe, params: ViewParams,
                  pool: ThreadPoolExecutor | None = None) -> torch.Tensor:
    """One view of a batch -> float32 (B, 3, S, S). Threads help: torch ops drop the GIL."""
    def one(i: int) -> torch.Tensor:
        return augment_one(images[i], view, params, i)

    idx = range(len(images))
    outs = list(pool.map(one, idx)) if pool is not None else [one(i) for i in idx]
    return torch.stack(outs)


def eval_view(image: torch.Tensor, size: int, resize: int, mean, std) -> torch.Tensor:
    """Deterministic eval transform: shorter side to `resize`, centre crop `size`, normalise.
    A shorter side that is already `resize` skips the resize (an identity: ~75 of ~400 us
    CPU per 32 px CIFAR image on this project's CPU box)."""
    x = image
    if min(image.shape[-2:]) != resize:
        x = F.resize(image, [resize], interpolation=F.InterpolationMode.BILINEAR, antialias=True)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.center_crop(x, [size, size])
    return normalize(x, mean, std)


class TorchvisionTwoView:
    """Views backend (two global crops + any local crops, one decode per image) in
    torchvision v2 (thread pool; torch kernels release the GIL).
    One batch at a time (`depth` 1: the loader calls `run`, never `submit` / `collect`)."""

    name = "torchvision"
    depth = 1

    def __init__(self, recipe, *, num_threads: int = 2, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False) -> None:
        self.recipe, self.dtype, self.channels_last = recipe, dtype, channels_last
        self._pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="sslstream-tv")

    def run(self, images: list[bytes], params: Sequence[ViewParams]) -> tuple[torch.Tensor, ...]:
        """One batch, decoded once: one tensor per view of the recipe (globals first)."""
        decoded = list(self._pool.map(decode, images))
        outs = []
        for view, vp in zip(self.recipe.views, params, strict=True):
            x = augment_batch(decoded, view, vp, self._pool).to(self.dtype)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            outs.append(x)
        return tuple(outs)

    def reset(self) -> None:
        pass

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class TorchvisionEval:
    name = "torchvision"

    def __init__(self, size: int, resize: int, mean, std, num_threads: int = 2) -> None:
        self.size, self.resize, self.mean, self.std = size, resize, mean, std
        self._pool = ThreadPoolExecutor(max(1, num_threads), thread_name_prefix="sslstream-tv-eval")

    def run(self, images: list[bytes]) -> torch.Tensor:
        def one(b: bytes) -> torch.Tensor:
            return eval_view(decode(b), self.size, self.resize, self.mean, self.std)

        return torch.stack(list(self._pool.map(one, images)))

    def reset(self) -> None:
        """Nothing to rebuild after a failed batch (DaliEval recompiles its graph)."""

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def torchvision_transform(view: ViewRecipe):
    """The recipe as a plain torchvision v2 Compose with torchvision's own randomness (random
    jitter order, torch RNG): the classic per-sample DataLoader pipeline, used as the
    throughput baseline. Not resumable; the loader backends use `augment_one` instead."""
    from torchvision.transforms import v2

    k = blur_kernel_size(view.blur_sigma[1])
    return v2.Compose([
        v2.RandomResizedCrop(view.size, scale=view.crop_scale, ratio=view.crop_ratio,
                             antialias=True),
        v2.RandomApply([v2.ColorJitter(view.brightness, view.contrast, view.saturation,
                                       view.hue)], p=view.jitter_p),
        v2.RandomGrayscale(p=view.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(k, sigma=view.blur_sigma)], p=view.blur_p),
        v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=view.solarize_p),
        v2.RandomHorizontalFlip(p=view.flip_p),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(view.mean), list(view.std)),
    ])


class TwoViewDataset(torch.utils.data.Dataset):
    """Encoded images -> (view1, view2) per sample with `torchvision_transform`: the
    DataLoader-with-workers baseline of benchmarks/pipeline_throughput.py."""

    def __init__(self, images: Sequence[bytes], recipe) -> None:
        self.images = list(images)
        self.transforms = [torchvision_transform(v) for v in recipe.views]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = decode(self.images[i])
        return self.transforms[0](image), self.transforms[1](image)
