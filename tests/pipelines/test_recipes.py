"""Recipes as data: presets vs the yaml group, validation, and the host-drawn parameters
checked against torchvision's RandomResizedCrop and binomial frequencies."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from sslstream.pipelines.views.recipes import (
    PRESETS,
    TwoViewRecipe,
    ViewRecipe,
    batch_rng,
    sample_crops,
    sample_view_params,
)
from torchvision.transforms import RandomResizedCrop

CONF = Path(__file__).resolve().parents[2] / "conf"
EXPECTED = {"byol", "simclr", "mocov2", "vicreg", "cifar_byol", "cifar_simclr", "cifar_mocov2",
            "cifar_vicreg"}


def test_yaml_group_equals_the_presets():
    files = {p.stem: p for p in (CONF / "augment").glob("*.yaml")}
    assert set(PRESETS) == EXPECTED and set(files) >= EXPECTED
    for name in EXPECTED:
        assert TwoViewRecipe.from_config(OmegaConf.load(files[name])) == PRESETS[name], name


# Method-specific files that compose on a preset through Hydra's defaults list (added with the
# trainer's method -> augment mapping): the values they must resolve to, from their sources.
DERIVED = {
    "barlow_twins": ("byol", {}),      # recipe=imagenet: the papers reuse these recipes
    "simsiam": ("mocov2", {}),
    "contrastive": ("simclr", {}),
    "cifar_barlow_twins": ("cifar_byol", {}),
    "cifar_contrastive": ("cifar_simclr", {}),
    "cifar_simsiam": ("cifar_simclr", {"brightness": 0.4, "contrast": 0.4, "saturation": 0.4,
                                       "hue": 0.1}),
}


def test_derived_yaml_presets_compose_to_their_base_with_their_changes():
    import dataclasses

    files = {p.stem for p in (CONF / "augment").glob("*.yaml")}
    assert files == EXPECTED | set(DERIVED)
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        for name, (base, changes) in DERIVED.items():
            cfg = compose(config_name="config", overrides=[f"augment={name}"])
            got = TwoViewRecipe.from_config(cfg.augment)
            b = PRESETS[base]
            want = TwoViewRecipe(view1=dataclasses.replace(b.view1, **changes),
                                 view2=dataclasses.replace(b.view2, **changes), name=name)
            assert got == want, name


def test_default_config_composes_to_cifar_byol():
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        cfg = compose(config_name="config")
        recipe = TwoViewRecipe.from_config(cfg.augment)
        over = compose(config_name="config", overrides=["augment=byol", "augment.view2.solarize_p=0.3"])
    assert recipe == PRESETS["cifar_byol"]
    assert TwoViewRecipe.from_config(over.augment).view2.solarize_p == 0.3


def test_published_values():
    byol = PRESETS["byol"]
    assert (byol.view1.blur_p, byol.view2.blur_p) == (1.0, 0.1)
    assert (byol.view1.solarize_p, byol.view2.solarize_p) == (0.0, 0.2)
    assert (byol.view1.brightness, byol.view1.contrast, byol.view1.saturation, byol.view1.hue) == \
        (0.4, 0.4, 0.2, 0.1)
    assert byol.size == 224 and byol.view1.crop_scale == (0.08, 1.0)
    simclr = PRESETS["simclr"]
    assert simclr.view1 == simclr.view2 and simclr.view1.brightness == 0.8 and simclr.view1.hue == 0.2
    assert PRESETS["mocov2"].view1.crop_scale == (0.2, 1.0)
    for name in EXPECTED:
        r = PRESETS[name]
        if name.startswith("cifar"):
            assert r.size == 32 and r.view1.blur_p == r.view2.blur_p == 0.0, name
    assert PRESETS["cifar_byol"].view2.solarize_p == 0.2
    assert PRESETS["cifar_byol"].view1.crop_scale == (0.08, 1.0)


def test_preset_key_with_overrides_and_errors_name_the_field():
    r = TwoViewRecipe.from_config({"preset": "byol", "view2": {"solarize_p": 0.5}})
    assert r.view2.solarize_p == 0.5 and r.view1 == PRESETS["byol"].view1 and r.name == "byol"
    with pytest.raises(ValueError, match="solarize_p=1.5"):
        TwoViewRecipe.from_config({"preset": "byol", "view2": {"solarize_p": 1.5}})
    with pytest.raises(ValueError, match="solarise_p"):
        TwoViewRecipe.from_config({"view1": {"solarise_p": 0.1}})
    with pytest.raises(ValueError, match="crop_scale"):
        ViewRecipe(crop_scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="share one output size"):
        TwoViewRecipe(view1=ViewRecipe(size=32), view2=ViewRecipe(size=64))


def test_crop_fallback_equals_torchvision():
    """When no draw fits (full-area crops of a 10x1000 strip), the centre crop with the
    ratio clamped is what torchvision's get_params returns too."""
    img = torch.zeros(3, 10, 1000)
    tv = RandomResizedCrop.get_params(img, scale=[1.0, 1.0], ratio=[0.75, 4 / 3])
    ours = sample_crops(np.random.default_rng(0), np.array([[10, 1000]]), (1.0, 1.0), (0.75, 4 / 3))
    assert tuple(int(v) for v in ours[0]) == tuple(tv)


def test_crop_distribution_matches_torchvision():
    """Area fraction and log aspect of 4000 crops of a 300x400 image: same means as
    torchvision's own sampler (5 sigma of the difference), every crop inside the image."""
    n, hw = 4000, np.array([[300, 400]] * 4000)
    ours = sample_crops(np.random.default_rng(1), hw, (0.08, 1.0), (0.75, 4 / 3)).astype(np.float64)
    torch.manual_seed(0)
    img = torch.zeros(3, 300, 400)
    tv = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [0.75, 4 / 3]) for _ in range(n)],
                  dtype=np.float64)
    for c in (ours, tv):
        assert (c[:, 0] >= 0).all() and (c[:, 1] >= 0).all()
        assert (c[:, 0] + c[:, 2] <= 300).all() and (c[:, 1] + c[:, 3] <= 400).all()
    for stat in (lambda c: c[:, 2] * c[:, 3] / 120_000, lambda c: np.log(c[:, 3] / c[:, 2]),
                 lambda c: (c[:, 1] + c[:, 3] / 2) / 400):
        a, b = stat(ours), stat(tv)
        se = math.sqrt(a.var() / n + b.var() / n)
        assert abs(a.mean() - b.mean()) < 5 * se, (a.mean(), b.mean())


def test_coin_frequencies_and_factor_ranges():
    view = PRESETS["byol"].view2
    hw = np.array([[64, 64]] * 20_000)
    p = sample_view_params(view, hw, batch_rng(0, 0, 0, 0, 1))
    n = len(hw)
    for drawn, prob in ((p.flip, view.flip_p), (p.jitter, view.jitter_p),
                        (p.grayscale, view.grayscale_p), (p.blur, view.blur_p),
                        (p.solarize, view.solarize_p)):
        assert abs(drawn.mean() - prob) <= 5 * math.sqrt(prob * (1 - prob) / n)
    assert p.brightness.min() >= 0.6 and p.brightness.max() <= 1.4
    assert p.saturation.min() >= 0.8 and p.saturation.max() <= 1.2
    assert np.abs(p.hue).max() <= 0.1 and p.sigma.min() >= 0.1 and p.sigma.max() <= 2.0
    assert abs(p.brightness.mean() - 1.0) < 0.01  # uniform on [1 - b, 1 + b]


def test_parameters_are_a_function_of_their_key():
    view, hw = PRESETS["cifar_byol"].view1, np.array([[32, 32]] * 64)
    a = sample_view_params(view, hw, batch_rng(0, 1, 0, 5, 0))
    b = sample_view_params(view, hw, batch_rng(0, 1, 0, 5, 0))
    assert all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("crop", "flip", "hue"))
    for other in ((1, 1, 0, 5, 0), (0, 2, 0, 5, 0), (0, 1, 1, 5, 0), (0, 1, 0, 6, 0), (0, 1, 0, 5, 1)):
        c = sample_view_params(view, hw, batch_rng(*other))
        assert not np.array_equal(a.crop, c.crop), other
    # a probability change does not shift the other draws
    d = sample_view_params(ViewRecipe(size=32, solarize_p=0.9, mean=view.mean, std=view.std),
                           hw, batch_rng(0, 1, 0, 5, 0))
    assert np.array_equal(a.crop, d.crop) and np.array_equal(a.flip, d.flip)
