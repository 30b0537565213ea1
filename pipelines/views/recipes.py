"""Augmentation recipes as data, and the per-sample random parameters drawn from them.

A recipe says *what* may happen to a view (crop scale, jitter strengths, probabilities);
`sample_view_params` draws *what does happen* to each sample of a batch. The draw happens
here, on the host, from a generator keyed by (seed, epoch, rank, batch index, view), and the
parameters are fed to whichever backend runs the pixels (DALI on GPU or CPU, or torchvision).
Doing it this way, rather than inside DALI with `fn.random.*`, is what makes a loader
resumable bit-for-bit: batch k of an epoch depends only on its key, never on how many
batches an operator's private RNG has already produced. It also lets the DALI graph and the
torchvision reference apply *identical* crops, flips and jitter factors, so parity tests
compare like with like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Annotated, Any, ClassVar

import numpy as np
from sslstream.conf.typed import Check, ConfigValueError, Ge, Interval, Typed, build, ordered_in

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOLARIZE_THRESHOLD = 128  # on 0..255 pixels, as BYOL / torchvision RandomSolarize(128)

Probability = Annotated[float, Interval(ge=0, le=1)]
Strength = Annotated[float, Ge(0)]  # a colour-jitter strength: factors drawn in [1 - s, 1 + s]
Range01 = Annotated[tuple[float, float], Check(ordered_in(0, 1), "0 < lo <= hi <= 1")]
PositiveRange = Annotated[tuple[float, float], Check(ordered_in(0), "0 < lo <= hi")]


def _positive(values: Sequence[float]) -> bool:
    return all(v > 0 for v in values)


@dataclass(frozen=True)
class ViewRecipe(Typed):
    """One view's augmentation: BYOL / SimCLR order crop -> jitter -> gray -> blur -> solarize -> flip.

    The values of each method come from its recipe file (conf/recipe/<method>_<regime>.yaml,
    ``augment.view1`` / ``augment.view2``); the defaults here are BYOL's first view at 224 px.
    """

    config_key: ClassVar[str] = "augment.view"
    size: Annotated[int, Ge(1)] = 224  # output side in pixels (both global views share it)
    crop_scale: Range01 = (0.08, 1.0)  # random-resized crop: area fraction of the source
    crop_ratio: PositiveRange = (3 / 4, 4 / 3)
    flip_p: Probability = 0.5
    jitter_p: Probability = 0.8
    brightness: Strength = 0.4
    contrast: Strength = 0.4
    saturation: Strength = 0.2
    hue: Annotated[float, Interval(ge=0, le=0.5)] = 0.1  # fraction of a full turn, as torchvision (0.1 = +-36 degrees)
    grayscale_p: Probability = 0.2
    blur_p: Probability = 0.0
    blur_sigma: PositiveRange = (0.1, 2.0)  # in output pixels
    solarize_p: Probability = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: Annotated[tuple[float, float, float], Check(_positive, "each > 0")] = IMAGENET_STD


@dataclass(frozen=True)
class LocalCrops(ViewRecipe):
    """Multi-crop's local crops (``augment.local``; Caron et al. 2020, SwAV Sec. 3.2):
    ``count`` more views of each image, smaller and cut from smaller regions, each with its
    own parameters. The defaults are DINO's and SwAV's ImageNet ones (96 px from 5-40 % of
    the image); ``count: 0`` (the default) is a two-view recipe."""

    config_key: ClassVar[str] = "augment.local"
    size: Annotated[int, Ge(1)] = 96  # output side in pixels: at most the global views' size
    crop_scale: Range01 = (0.05, 0.4)
    count: Annotated[int, Ge(0)] = 0  # local crops per image (DINO: 10, SwAV: 6; 0: none)
    # null: the global views' normalisation (view1's), as in DINO and SwAV, where every crop
    # is normalised alike; a recipe's CIFAR statistics then reach its local crops too
    mean: tuple[float, float, float] | None = None
    std: Annotated[tuple[float, float, float], Check(_positive, "each > 0")] | None = None


@dataclass(frozen=True)
class TwoViewRecipe(Typed):
    """The two (possibly asymmetric) global views of a joint-embedding method, and the
    local crops of a multi-crop one (``augment.*``). ``views`` lists them in the order the
    loader's batches and a method's ``training_step`` take them: view1, view2, then
    ``local.count`` local crops."""

    config_key: ClassVar[str] = "augment"
    view1: ViewRecipe = field(default_factory=ViewRecipe)
    view2: ViewRecipe = field(default_factory=ViewRecipe)
    local: LocalCrops = field(default_factory=LocalCrops)
    name: str = "custom"  # a label for logs (the recipe's augmentation, e.g. cifar_byol)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.view1.size != self.view2.size:
            raise ConfigValueError(f"augment views must share one output size, got "
                                   f"{self.view1.size} and {self.view2.size}",
                                   "augment.view2.size")
        if self.local.count and self.local.size > self.view1.size:
            raise ConfigValueError(
                f"augment.local.size={self.local.size} is larger than the global views' "
                f"augment.view1.size={self.view1.size}: local crops are the small views of "
                "multi-crop (DINO / SwAV: 96 px beside 224 px); lower augment.local.size",
                "augment.local.size")
        if self.local.mean is None or self.local.std is None:
            same = replace(self.local, mean=self.local.mean or self.view1.mean,
                           std=self.local.std or self.view1.std)
            object.__setattr__(self, "local", same)  # frozen: resolved once, here

    @property
    def views(self) -> tuple[ViewRecipe, ...]:
        """Every view's recipe: the two global ones, then ``local.count`` local ones."""
        return (self.view1, self.view2, *(self.local,) * self.local.count)

    @property
    def size(self) -> int:
        """The global views' side in pixels."""
        return self.view1.size

    @property
    def sizes(self) -> tuple[int, ...]:
        """The distinct view sides, global first (one entry for a two-view recipe)."""
        return (self.view1.size, self.local.size) if self.local.count else (self.view1.size,)

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | TwoViewRecipe) -> TwoViewRecipe:
        """``cfg.augment`` (``{name, view1: {...}, view2: {...}, local: {...}}``) as a
        checked recipe."""
        return cfg if isinstance(cfg, cls) else build(cls, cfg, "augment")


# ---------------------------------------------------------------- per-sample parameters
@dataclass
class ViewParams:
    """What happens to each sample of one batch in one view (arrays of length B)."""

    crop: np.ndarray        # (B, 4) int32: top, left, height, width in source pixels
    flip: np.ndarray        # (B,) bool
    jitter: np.ndarray      # (B,) bool
    brightness: np.ndarray  # (B,) float32 factor (1 = unchanged)
    contrast: np.ndarray    # (B,) float32 factor
    saturation: np.ndarray  # (B,) float32 factor
    hue: np.ndarray         # (B,) float32, fraction of a turn in [-0.5, 0.5]
    grayscale: np.ndarray   # (B,) bool
    blur: np.ndarray        # (B,) bool
    sigma: np.ndarray       # (B,) float32
    solarize: np.ndarray    # (B,) bool

    def take(self, idx: Sequence[int] | np.ndarray) -> ViewParams:
        return ViewParams(**{f.name: getattr(self, f.name)[np.asarray(idx)] for f in fields(self)})


def batch_rng(seed: int, epoch: int, rank: int, batch: int, view: int) -> np.random.Generator:
    """The generator of one (batch, view): a pure function of its key, hence resumable."""
    return np.random.default_rng([int(seed), int(epoch), int(rank), int(batch), int(view)])


def sample_crops(rng: np.random.Generator, hw: np.ndarray, scale, ratio) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised over a batch of (H, W) sizes.

    Ten attempts per sample; the first that fits wins; otherwise the centre crop with the
    ratio clamped to the allowed range (the same fallback as torchvision).
    """
    hw = np.asarray(hw, dtype=np.int64).reshape(-1, 2)
    n, tries = len(hw), 10
    height, width = hw[:, 0:1].astype(np.float64), hw[:, 1:2].astype(np.float64)
    area = height * width
    target = area * rng.uniform(scale[0], scale[1], size=(n, tries))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, tries)))
    w = np.round(np.sqrt(target * aspect))
    h = np.round(np.sqrt(target / aspect))
    ok = (w > 0) & (h > 0) & (w <= width) & (h <= height)
    u_top, u_left = rng.random((n, tries)), rng.random((n, tries))
    first = np.argmax(ok, axis=1)
    rows = np.arange(n)
    out = np.zeros((n, 4), dtype=np.int32)
    any_ok = ok[rows, first]
    ch, cw = h[rows, first], w[rows, first]
    top = np.floor(u_top[rows, first] * (height[:, 0] - ch + 1))
    left = np.floor(u_left[rows, first] * (width[:, 0] - cw + 1))
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = top, left, ch, cw
    if not any_ok.all():  # fallback: whole image, ratio clamped (torchvision semantics)
        for i in np.flatnonzero(~any_ok):
            H, W = int(hw[i, 0]), int(hw[i, 1])
            in_ratio = W / H
            if in_ratio < ratio[0]:
                fw, fh = W, int(round(W / ratio[0]))
            elif in_ratio > ratio[1]:
                fh, fw = H, int(round(H * ratio[1]))
            else:
                fw, fh = W, H
            out[i] = ((H - fh) // 2, (W - fw) // 2, fh, fw)
    return out


def sample_view_params(view: ViewRecipe, hw: np.ndarray, rng: np.random.Generator) -> ViewParams:
    """Draw one view's parameters for a batch whose source images have sizes `hw` (B, 2).

    Every array is drawn whatever the probabilities, so changing one probability never
    shifts the stream of the others.
    """
    n = len(hw)
    crop = sample_crops(rng, hw, view.crop_scale, view.crop_ratio)

    def factor(strength: float) -> np.ndarray:
        return rng.uniform(max(0.0, 1.0 - strength), 1.0 + strength, n).astype(np.float32)

    coins = rng.random((n, 5))
    brightness, contrast, saturation = factor(view.brightness), factor(view.contrast), factor(view.saturation)
    hue = rng.uniform(-view.hue, view.hue, n).astype(np.float32)
    sigma = rng.uniform(view.blur_sigma[0], view.blur_sigma[1], n).astype(np.float32)
    return ViewParams(
        crop=crop,
        flip=coins[:, 0] < view.flip_p,
        jitter=coins[:, 1] < view.jitter_p,
        brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
        grayscale=coins[:, 2] < view.grayscale_p,
        blur=coins[:, 3] < view.blur_p,
        sigma=sigma,
        solarize=coins[:, 4] < view.solarize_p,
    )


def blur_kernel_size(sigma: float) -> int:
    """Odd Gaussian window covering +-3 sigma: DALI's own default, used by both backends."""
    return 2 * math.ceil(3 * float(sigma)) + 1
