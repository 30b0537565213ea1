"""The torchvision reference, checked against formulas recomputed here in float64."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from sslstream.pipelines.views.recipes import ViewParams, ViewRecipe
from sslstream.pipelines.views.reference import augment_one, decode, eval_view

from tests.pipelines.augment_helpers import encode_jpeg, pattern_image

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def params(n: int = 1, *, crop=(0, 0, 32, 32), **flags) -> ViewParams:
    base = {"flip": False, "jitter": False, "grayscale": False, "blur": False, "solarize": False}
    base.update(flags)
    return ViewParams(
        crop=np.array([crop] * n, dtype=np.int32),
        **{k: np.array([v] * n) for k, v in base.items()},
        brightness=np.ones(n, np.float32), contrast=np.ones(n, np.float32),
        saturation=np.ones(n, np.float32), hue=np.zeros(n, np.float32),
        sigma=np.full(n, 1.0, np.float32),
    )


def expected(img: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> normalised (3, H, W) float64, by the formula."""
    x = img.astype(np.float64) / 255.0
    x = (x - np.array(MEAN)) / np.array(STD)
    return torch.from_numpy(x).permute(2, 0, 1)


def grey_levels(out: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in 0..255 units (undoing the per-channel std)."""
    std = torch.tensor(STD, dtype=torch.float64).view(3, 1, 1)
    return float(((out.double() - want).abs() * std * 255).max())


def test_decode_is_rgb_uint8_chw():
    img = pattern_image(0, 20, 30)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    out = decode(png.getvalue())  # lossless: exactly the pixels
    assert out.shape == (3, 20, 30) and out.dtype == torch.uint8
    assert np.array_equal(out.permute(1, 2, 0).numpy(), img)
    gray = io.BytesIO()
    Image.fromarray(img[..., 0]).save(gray, format="JPEG")
    assert decode(gray.getvalue()).shape == (3, 20, 30)  # grayscale JPEG -> 3 channels
    assert decode(np.frombuffer(encode_jpeg(img), np.uint8)).shape == (3, 20, 30)


def test_unit_scale_crop_flip_solarize_grayscale_by_formula():
    img = pattern_image(1, 48, 40)
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    view = ViewRecipe(size=16, mean=MEAN, std=STD)
    # a 16x16 crop at (5, 7) resized to 16: exactly a slice
    out = augment_one(t, view, params(crop=(5, 7, 16, 16)), 0)
    torch.testing.assert_close(out.double(), expected(img[5:21, 7:23]), atol=1e-6, rtol=0)
    flipped = augment_one(t, view, params(crop=(5, 7, 16, 16), flip=True), 0)
    torch.testing.assert_close(flipped.double(), expected(img[5:21, 7:23][:, ::-1]), atol=1e-6, rtol=0)
    sol = augment_one(t, view, params(crop=(5, 7, 16, 16), solarize=True), 0)
    patch = img[5:21, 7:23].astype(np.int64)
    torch.testing.assert_close(sol.double(), expected(np.where(patch >= 128, 255 - patch, patch)),
                               atol=1e-6, rtol=0)
    gray = augment_one(t, view, params(crop=(5, 7, 16, 16), grayscale=True), 0)
    y = patch @ np.array([0.299, 0.587, 0.114])
    want = expected(np.repeat(y[..., None], 3, axis=-1))
    assert grey_levels(gray, want) <= 1.01  # uint8 rounding


def test_brightness_and_blur_by_formula():
    img = pattern_image(2, 32, 32)
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    view = ViewRecipe(size=32, mean=MEAN, std=STD)
    p = params(jitter=True)
    p.brightness[:] = 1.3
    out = augment_one(t, view, p, 0)
    want = expected(np.clip(img.astype(np.float64) * 1.3, 0, 255))
    assert grey_levels(out, want) <= 1.01
    # blur with sigma 1, 7-tap window (+-3 sigma), reflect padding: separable float64 reference
    blurred = augment_one(t, view, params(blur=True), 0)
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    k /= k.sum()
    pad = np.pad(img.astype(np.float64), ((3, 3), (3, 3), (0, 0)), mode="reflect")
    rows = sum(k[i] * pad[i : i + 32] for i in range(7))
    ref = sum(k[i] * rows[:, i : i + 32] for i in range(7))
    assert grey_levels(blurred, expected(ref)) <= 1.01


def test_eval_view_resizes_shorter_side_and_centre_crops():
    img = pattern_image(3, 60, 80)
    t = torch.from_numpy(img).permute(2, 0, 1).contiguous()
    out = eval_view(t, 30, 60, MEAN, STD)  # no resize needed: shorter side already 60
    torch.testing.assert_close(out.double(), expected(img[15:45, 25:55]), atol=1e-6, rtol=0)
    small = eval_view(t, 24, 30, MEAN, STD)  # 60x80 -> 30x40 -> centre 24x24
    assert small.shape == (3, 24, 24)
