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
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOLARIZE_THRESHOLD = 128  # on 0..255 pixels, as BYOL / torchvision RandomSolarize(128)


@dataclass(frozen=True)
class ViewRecipe:
    """One view's augmentation: BYOL / SimCLR order crop -> jitter -> gray -> blur -> solarize -> flip."""

    size: int = 224
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1  # fraction of a full turn, as torchvision (0.1 = +-36 degrees)
    grayscale_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"augment.{name}={value} is not a probability in [0, 1]")
        if self.size < 1:
            raise ValueError(f"augment.size={self.size} must be a positive number of pixels")
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"augment.crop_scale={self.crop_scale} must satisfy 0 < lo <= hi <= 1")
        if not 0.0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"augment.crop_ratio={self.crop_ratio} must satisfy 0 < lo <= hi")
        if not 0.0 <= self.hue <= 0.5:
            raise ValueError(f"augment.hue={self.hue} must be in [0, 0.5]")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name}={getattr(self, name)} must be >= 0")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"augment.blur_sigma={self.blur_sigma} must satisfy 0 < lo <= hi")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"augment.mean/std must be 3 values (std > 0): {self.mean} {self.std}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ViewRecipe:
        known = {f.name for f in fields(cls)}
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown augment view field(s) {sorted(unknown)}; known: {sorted(known)}")
        kwargs = {k: (tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v)
                  for k, v in cfg.items()}
        return cls(**kwargs)


@dataclass(frozen=True)
class TwoViewRecipe:
    """The two (possibly asymmetric) views of a joint-embedding method."""

    view1: ViewRecipe = field(default_factory=ViewRecipe)
    view2: ViewRecipe = field(default_factory=ViewRecipe)
    name: str = "custom"

    def __post_init__(self) -> None:
        if self.view1.size != self.view2.size:
            raise ValueError(f"augment views must share one output size, got "
                             f"{self.view1.size} and {self.view2.size}")

    @property
    def views(self) -> tuple[ViewRecipe, ViewRecipe]:
        return (self.view1, self.view2)

    @property
    def size(self) -> int:
        return self.view1.size

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> TwoViewRecipe:
        """Build from the `augment` config group: `{name, view1: {...}, view2: {...}}`.

        `preset: <name>` starts from a built-in preset and applies the given view fields on top
        (so `augment.view2.solarize_p=0.3` style overrides also work without a yaml file).
        """
        cfg = _to_plain(cfg)
        base = PRESETS[cfg["preset"]] if cfg.get("preset") else None
        views = []
        for key in ("view1", "view2"):
            given = dict(cfg.get(key) or {})
            if base is not None:
                merged = {f.name: getattr(getattr(base, key), f.name) for f in fields(ViewRecipe)}
                merged.update(given)
                given = merged
            views.append(ViewRecipe.from_config(given))
        name = cfg.get("name") or (cfg.get("preset") or "custom")
        return cls(view1=views[0], view2=views[1], name=str(name))


def _to_plain(cfg: Any) -> dict:
    try:  # OmegaConf DictConfig -> dict, without importing omegaconf when it is not one
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return dict(cfg)


# ---------------------------------------------------------------- presets (sources in docs/augment.md)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _byol_pair(size: int, blur: tuple[float, float], mean, std) -> tuple[ViewRecipe, ViewRecipe]:
    """BYOL's asymmetric pair: view 2 blurs less often and is the only one solarized."""
    v1 = ViewRecipe(size=size, blur_p=blur[0], solarize_p=0.0, mean=mean, std=std)
    v2 = ViewRecipe(size=size, blur_p=blur[1], solarize_p=0.2, mean=mean, std=std)
    return v1, v2


def _sym(**kw) -> TwoViewRecipe:
    name = kw.pop("name")
    v = ViewRecipe(**kw)
    return TwoViewRecipe(view1=v, view2=v, name=name)


PRESETS: dict[str, TwoViewRecipe] = {
    # BYOL (Grill et al. 2020, table 6) / VICReg (Bardes et al. 2022, official augmentations.py)
    "byol": TwoViewRecipe(*_byol_pair(224, (1.0, 0.1), IMAGENET_MEAN, IMAGENET_STD), name="byol"),
    "vicreg": TwoViewRecipe(*_byol_pair(224, (1.0, 0.1), IMAGENET_MEAN, IMAGENET_STD), name="vicreg"),
    # SimCLR (Chen et al. 2020, appendix A): colour strength s=1, blur p=0.5
    "simclr": _sym(name="simclr", size=224, brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2,
                   blur_p=0.5),
    # MoCo v2 (Chen et al. 2020, facebookresearch/moco main_moco.py --aug-plus)
    "mocov2": _sym(name="mocov2", size=224, crop_scale=(0.2, 1.0), brightness=0.4, contrast=0.4,
                   saturation=0.4, hue=0.1, blur_p=0.5),
    # CIFAR variants: 32 px, no blur (solo-learn scripts/pretrain/cifar/*)
    "cifar_byol": TwoViewRecipe(*_byol_pair(32, (0.0, 0.0), CIFAR_MEAN, CIFAR_STD), name="cifar_byol"),
    "cifar_simclr": _sym(name="cifar_simclr", size=32, brightness=0.8, contrast=0.8, saturation=0.8,
                         hue=0.2, mean=CIFAR_MEAN, std=CIFAR_STD),
    "cifar_mocov2": _sym(name="cifar_mocov2", size=32, brightness=0.4, contrast=0.4, saturation=0.4,
                         hue=0.1, mean=CIFAR_MEAN, std=CIFAR_STD),
    "cifar_vicreg": _sym(name="cifar_vicreg", size=32, crop_scale=(0.2, 1.0), solarize_p=0.1,
                         mean=CIFAR_MEAN, std=CIFAR_STD),
}


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
